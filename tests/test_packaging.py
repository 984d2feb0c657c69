"""The pure-Python wheel: `pip wheel .` on a machine without the CUDA build flag gives a wheel that
installs into its own folder and works from there (package data and the kernels subpackage
included, no extension)."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_pure_python_wheel_installs_and_runs(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "FUSEDLORA_BUILD_CUDA"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(tmp_path.glob("fusedlora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusedlora/data/amazon_reviews.tsv" in names and "fusedlora/kernels/forward.py" in names
    assert not any("/_C" in name for name in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    smoke = textwrap.dedent(f"""
        import torch, fusedlora
        from fusedlora.demo import load_reviews
        assert fusedlora.__file__.startswith({str(site)!r})
        w = fusedlora.quantize(torch.randn(48, 64), "nf4")
        layer = fusedlora.LoRALinear(w, r=4)
        layer(torch.randn(3, 64)).sum().backward()
        assert layer.lora_B.weight.grad is not None and len(load_reviews()) == 1000
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", smoke], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
