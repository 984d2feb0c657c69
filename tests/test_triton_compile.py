"""The Triton kernels compile for real GPUs on this CPU-only machine (Triton's ahead-of-time
path), and the shipped configs do not spill registers: sm_90 (Hopper) and sm_80 (Ampere), under
whichever Triton is installed (CI runs this file under Triton 3.8 and 3.6)."""

import os
import shlex
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from fusedlora.kernels import aot  # noqa: E402  (after the skip: importing it imports Triton)


def _compile_env(**extra) -> dict:
    return {**{key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}, **extra}


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills(arch):
    result = subprocess.run([sys.executable, "-m", "fusedlora.kernels.aot", "--arch", str(arch), "--check"],
                            capture_output=True, text=True, env=_compile_env(), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert [row.split()[0] for row in rows] == [variant.name for variant in aot.variants(arch)], result.stdout
    assert not any("FAILED" in row for row in rows), result.stdout
    if arch == 90:
        gemms = [row for row in rows if row.startswith(("forward/", "grad_x/"))]
        assert gemms and all(row.endswith("wgmma") for row in gemms), "the Hopper GEMMs must use wgmma"


def test_the_report_reads_the_ptx_with_the_ptxas_that_triton_compiled_it_with(tmp_path):
    """TRITON_PTXAS_PATH chooses the ptxas for Triton's compile and for the register report alike
    (another ptxas may not read the PTX version that the chosen one was given)."""
    from triton.backends.nvidia.compiler import get_ptxas

    calls = tmp_path / "calls"
    wrapper = tmp_path / "ptxas"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexec {shlex.quote(get_ptxas(90).path)} "$@"\n')
    wrapper.chmod(0o755)
    script = textwrap.dedent("""
        from fusedlora.kernels import aot
        variant = next(v for v in aot.variants(90) if v.name == "shrink")
        report = aot.resource_report(variant.name, aot.compile_variant(variant, 90))
        assert report.registers > 0 and report.spill_stores == 0, report
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_compile_env(TRITON_PTXAS_PATH=str(wrapper), TRITON_CACHE_DIR=str(tmp_path / "cache")),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = calls.read_text().splitlines()
    assert any("--gpu-name=" in line for line in lines), lines  # Triton's own compile
    assert any(" -v " in f" {line} " and os.devnull in line for line in lines), lines  # the report
