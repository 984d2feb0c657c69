"""Determinism: the same inputs and seed give bit-identical outputs and gradients on repeated calls
of one backend, and under `torch.use_deterministic_algorithms(True)` no backend reduces with
atomics. On a GPU the Triton backend's dB and the CUDA backend's dB add with fp32 atomics by default
(as torch's own index_add does); deterministic mode switches them to per-block partials summed in
a fixed order. The Triton small-M kernel's split-K slices are always summed in slice order."""

import pytest
import torch

from fusedlora import fused_lora_linear, quantize
from helpers import on_backend, random_weight

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _results(backend, device, m, k=192, n=80, r=8, fmt="nf4", dtype=torch.bfloat16, p=0.1, seed=11):
    """y and (dx, dA, dB, dbias) of one fixed problem, computed afresh."""
    g = torch.Generator().manual_seed(0)
    weight = quantize(random_weight(n, k, generator=g).to(device), fmt)
    leaves = [t.to(device, dtype).requires_grad_() for t in
              (torch.randn(m, k, generator=g), torch.randn(r, k, generator=g) / k**0.5,
               torch.randn(n, r, generator=g), torch.randn(n, generator=g))]
    grad_y = torch.randn(m, n, generator=g).to(device, dtype)
    with on_backend(backend, device):
        y = fused_lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, leaves[3], p, seed=seed)
        y.backward(grad_y)
    return [y.detach()] + [t.grad for t in leaves]


def _assert_repeatable(backend, device, m, **problem):
    first = _results(backend, device, m, **problem)
    for _ in range(2):
        for name, a, b in zip(("y", "dx", "dA", "dB", "dbias"), first, _results(backend, device, m, **problem)):
            assert torch.equal(a, b), f"{backend}: {name} differs between two identical calls"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_repeated_calls_are_bitwise_identical_on_the_cpu(backend, m, fmt):
    _assert_repeatable(backend, "cpu", m, fmt=fmt)


def test_a_different_seed_gives_a_different_dropout_mask():
    a = _results("reference", "cpu", 40, seed=1)
    b = _results("reference", "cpu", 40, seed=2)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return run


def test_deterministic_mode_turns_the_triton_atomics_off(monkeypatch, deterministic):
    """With the GPU's choices forced on the interpreter (atomic dB, split-K small-M kernel), deterministic
    mode launches the partial-sum dB instead and keeps the split-K kernel (its in-launch sum runs in
    slice order), and the results still match."""
    launch = pytest.importorskip("fusedlora.backends.triton_launch")
    configs = pytest.importorskip("fusedlora.kernels.configs")
    monkeypatch.setitem(configs.INTERPRETER, "atomics", True)
    monkeypatch.setitem(configs.INTERPRETER, "small_m_split_k", 3)
    launches = {"grad_u": [], "small_m": []}
    monkeypatch.setattr(launch, "lora_grad_u_kernel", _LaunchSpy(launch.lora_grad_u_kernel, launches["grad_u"]))
    monkeypatch.setattr(launch, "lora_small_m_kernel", _LaunchSpy(launch.lora_small_m_kernel, launches["small_m"]))
    _assert_repeatable("triton", "cpu", 5)
    assert launches["small_m"] and all(kw["SPLIT_K"] == 3 for kw in launches["small_m"])
    assert launches["grad_u"] and not any(kw["ATOMIC_DB"] for kw in launches["grad_u"])

    torch.use_deterministic_algorithms(False)  # and without it, the GPU's atomic paths are taken
    launches["grad_u"].clear(), launches["small_m"].clear()
    _results("triton", "cpu", 5)
    assert launches["small_m"][0]["SPLIT_K"] == 3 and launches["grad_u"][0]["ATOMIC_DB"]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_GPU) for b in ("triton", "cuda")])
@pytest.mark.parametrize("m", [8, 4096])
def test_deterministic_mode_is_bitwise_repeatable_on_the_gpu(backend, m, deterministic):
    """Shapes with split reductions: the split-K small-M kernel (M = 8, K = 4096; summed in slice
    order inside its launch) and many row blocks adding into dB (M = 4096; atomics by default)."""
    _assert_repeatable(backend, "cuda", m, k=4096, n=1024, r=16)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_GPU) for b in ("triton", "cuda")])
def test_the_large_m_forward_is_bitwise_repeatable_on_the_gpu_by_default(backend):
    """No atomics in the M > 16 forward, deterministic mode or not."""
    first = _results(backend, "cuda", 2048, k=4096, n=1024, r=16)[0]
    assert torch.equal(first, _results(backend, "cuda", 2048, k=4096, n=1024, r=16)[0])
