"""The CUDA extension without a GPU: it builds (sm_90) into a wheel with nvcc and the CUDA build
of torch, loads, registers ops whose schemas match the Python ops, answers fake tensors like them,
compiles without register spills, ships its sources in the sdist, and a broken library is one
warning, not a crash. Executing the kernels needs a GPU: tests/test_gpu.py (`-m gpu`)."""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fusedlora.inspection.sass import cuobjdump

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built with FUSEDLORA_BUILD_CUDA=1 for sm_90, installed into its own folder."""
    assert shutil.which("nvcc"), "nvcc is needed to build the CUDA extension (see README, Development)"
    assert torch.version.cuda, "a CUDA build of torch is needed to build the CUDA extension"
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "FUSEDLORA_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "2"}
    built = _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(out)],
                 env=env, timeout=1800)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    wheel = next(out.glob("fusedlora-*.whl"))
    site = out / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                     timeout=600)
    assert installed.returncode == 0, installed.stderr
    return wheel, site


def _python(site: Path, script: str):
    """Run `script` with the installed wheel first on the path (and not from the source tree)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return _run([sys.executable, "-c", textwrap.dedent(script)], cwd=site.parent, env=env, timeout=600)


def test_the_wheel_holds_the_extension(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("fusedlora/_C") and name.endswith(".so") for name in names), names
    assert "fusedlora/kernels/forward.py" in names and "fusedlora/backends/triton_launch.py" in names
    assert "fusedlora/extension.py" in names


def test_the_extension_loads_and_its_ops_match_the_python_ops(installed):
    _, site = installed
    result = _python(site, """
        import torch, fusedlora
        from fusedlora import extension
        assert fusedlora.__file__.startswith(%r), fusedlora.__file__
        assert extension.load() is None
        def signature(op):
            schema = op.default._schema
            arguments = [(a.name, str(a.type).replace("SymInt", "int")) for a in schema.arguments]
            return arguments, [str(r.type) for r in schema.returns]
        # The dispatching ops also carry the backend that ran the forward; a backend's own ops do not,
        # and the CUDA ops take the large-M regime the Python backend chose.
        arguments, (*returns, backend) = signature(torch.ops.fusedlora.lora_linear_fwd)
        regime = [("regime", "str")]
        assert backend == "Tensor" and signature(torch.ops.fusedlora.cuda_lora_fwd) == (arguments + regime, returns)
        (*arguments, backend), returns = signature(torch.ops.fusedlora.lora_linear_bwd)
        assert backend == ("backend", "Tensor")
        assert signature(torch.ops.fusedlora.cuda_lora_bwd) == (arguments + regime, returns)
        print("ok")
    """ % str(site))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_fake_tensors_get_the_same_outputs_as_the_python_ops(installed):
    _, site = installed
    result = _python(site, """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fusedlora import extension, quantize
        assert extension.load() is None
        for fmt in ("nf4", "int8", "fp8", "dense"):
            weight = quantize(torch.randn(48, 64), fmt)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                tensors = [mode.from_tensor(t).to("cuda") for t in weight.tensors()]
                x = torch.empty(33, 64, device="cuda", dtype=torch.bfloat16)
                a = torch.empty(8, 64, device="cuda")
                b = torch.empty(48, 8, device="cuda")
                seed = torch.tensor(3)
                args = (x, tensors, fmt, [48, 64], weight.blocksize, a, b, 2.0, None, 0.1, seed)
                *theirs, backend = torch.ops.fusedlora.lora_linear_fwd(*args)
                g = torch.empty(33, 48, device="cuda", dtype=torch.bfloat16)
                for regime in ("fused", "workspace"):
                    ours = torch.ops.fusedlora.cuda_lora_fwd(*args, regime)
                    assert len(ours) == len(theirs) and (backend.shape, backend.dtype) == ((), torch.int64)
                    for o, t in zip(ours, theirs):
                        assert (o.shape, o.dtype, o.device, o.stride()) == (t.shape, t.dtype, t.device, t.stride())
                    for need_dx in (True, False):
                        bwd = (g, x, ours[1], tensors, fmt, [48, 64], weight.blocksize, a, b, 2.0, 0.1, seed, need_dx)
                        for o, t in zip(torch.ops.fusedlora.cuda_lora_bwd(*bwd, regime),
                                        torch.ops.fusedlora.lora_linear_bwd(*bwd, backend)):
                            assert (o.shape, o.dtype, o.device, o.stride()) == (t.shape, t.dtype, t.device, t.stride())
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_cuda_backend_says_why_it_cannot_run_here(installed):
    _, site = installed
    result = _python(site, """
        import torch
        from fusedlora.backends import Problem, backends
        cuda = {b.name: b for b in backends()}["cuda"]
        print(cuda.why_not(Problem(torch.device("cpu"), torch.bfloat16, torch.float32, "nf4", 16, 64, 64)))
        print(cuda.why_not(Problem(torch.device("cuda"), torch.bfloat16, torch.float32, "nf4", 16, 64, 64)))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["takes CUDA tensors only", "no CUDA device is available"]


def test_no_kernel_spills_registers(installed):
    _, site = installed
    library = next((site / "fusedlora").glob("_C*.so"))
    report = _run([cuobjdump(), "--dump-resource-usage", str(library)], timeout=120).stdout
    kernels = [line for line in report.splitlines() if "Function" in line]
    usages = [line for line in report.splitlines() if "REG:" in line]
    assert len(kernels) == len(usages) >= 30, report
    for name, usage in zip(kernels, usages):
        assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{name.strip()} uses local memory: {usage.strip()}"


def test_the_sdist_ships_the_sources(tmp_path):
    result = _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr
    members = tarfile.open(next(tmp_path.glob("fusedlora-*.tar.gz"))).getnames()
    for source in ("csrc/gemm.cu", "csrc/gemm_mma.cu", "csrc/small_m.cu", "csrc/small_m_mma.cu", "csrc/lora.cu",
                   "csrc/ops.cpp", "csrc/lora_ops.cpp", "csrc/common.cuh", "csrc/device.cuh", "csrc/small_m.cuh",
                   "csrc/weight_chunks.cuh", "csrc/gemm_epilogue.cuh", "csrc/dequantize.cu"):
        assert any(member.endswith(source) for member in members), source


def test_a_broken_extension_is_one_warning_and_the_other_backends_work(installed, tmp_path):
    _, site = installed
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    next((broken / "fusedlora").glob("_C*.so")).write_bytes(b"not a shared library")
    result = _python(broken, """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from fusedlora import extension, fused_lora_linear, quantize
        assert extension.load().startswith("fusedlora._C failed to load")
        extension.load()
        y = fused_lora_linear(torch.randn(3, 64), quantize(torch.randn(8, 64), "nf4"), torch.randn(4, 64),
                              torch.randn(8, 4), 1.0)
        print(tuple(y.shape))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 8)"
    assert result.stderr.count("fusedlora._C failed to load") == 1


@pytest.mark.slow
def test_the_just_in_time_build_compiles_and_loads(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "2"}
    result = _run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from fusedlora import extension
        extension.build_jit()
        print(hasattr(torch.ops.fusedlora, "cuda_lora_fwd"))
    """)], env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("True")
    assert "compiling the CUDA extension just in time" in result.stderr
