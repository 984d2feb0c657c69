"""The command line: `python -m fusedlora info` and the demo (README command 1)."""

import re
import subprocess
import sys

from fusedlora.demo import run_demo


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fusedlora", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_lists_the_reference_backend():
    out = _run("info")
    assert "fusedlora" in out and re.search(r"cpu\s+reference\s+available", out)


def test_demo_trains_the_adapters():
    out = _run("demo", "--steps", "150")
    before, after = map(float, re.search(r"teacher: ([\d.]+) before -> ([\d.]+) after", out).groups())
    assert after < 0.3 * before
    assert re.search(r"trainable%: \d", out) and "MiB as nf4" in out


def test_demo_figures():
    figures = run_demo(steps=20, width=64, hidden=128, batch=16, rank=4)
    assert figures["nf4_weight_bytes"] < figures["dense_weight_bytes"] / 4
    assert figures["summary"].trainable_params == 4 * (64 + 128) * 2
    assert figures["loss_after"] < figures["loss_before"]
