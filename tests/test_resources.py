"""Resources: no memory growth over a thousand training steps, and concurrent calls from several
threads give the results of calls made one at a time (Triton's autotuner, its interpreter and the
kernel caches are shared state, guarded by a lock in fusedlora.backends.triton_launch)."""

import contextvars
import gc
import sys
import threading
import warnings

import pytest
import torch

from fusedlora import LoRALinear, fused_lora_linear, quantize
from helpers import assert_close, on_backend, random_weight

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def _live_tensors() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some deprecated torch objects warns
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _layer(device="cpu"):
    torch.manual_seed(0)
    layer = LoRALinear(quantize(random_weight(256, 256).to(device), "nf4"), torch.randn(256, device=device),
                       r=16, dropout=0.1)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return layer.train()


def _steps(layer, optimizer, count, device="cpu"):
    for _ in range(count):
        x = torch.randn(64, 256, device=device, requires_grad=True)  # 64 KiB: a leak per step shows
        loss = layer(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_thousand_steps_on_the_cpu_do_not_grow_memory():
    """Leaking one activation per step would add 64 MiB; the process may grow by at most 32
    (allocator arenas and fragmentation move by a few)."""
    layer = _layer()
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    _steps(layer, optimizer, 100)  # warm up: allocator pools, optimizer state
    gc.collect()
    tensors, resident = _live_tensors(), _resident_bytes()
    _steps(layer, optimizer, 1000)
    gc.collect()
    assert _live_tensors() == tensors
    assert _resident_bytes() - resident < 32 * 2**20


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_GPU) for b in ("triton", "cuda", "reference")])
def test_a_thousand_steps_on_the_gpu_do_not_grow_memory(backend):
    with on_backend(backend, "cuda"):
        layer = _layer("cuda")
        optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
        _steps(layer, optimizer, 100, "cuda")
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        _steps(layer, optimizer, 1000, "cuda")
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated


def _problems(device, count=4):
    """Different shapes (so that the threads also race to compile and tune), fixed inputs."""
    g = torch.Generator().manual_seed(5)
    problems = []
    for i in range(count):
        m, k, n = (5, 33)[i % 2] + i, 64 + 32 * i, 48 + 16 * i
        problems.append((torch.randn(m, k, generator=g).to(device), quantize(random_weight(n, k).to(device), "nf4"),
                         (torch.randn(8, k, generator=g) / k**0.5).to(device), torch.randn(n, 8, generator=g).to(device)))
    return problems


def _forward_backward(problem):
    x, weight, lora_A, lora_B = (t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in problem)
    y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, None, 0.1, seed=3)
    y.square().sum().backward()
    return [y.detach(), x.grad, lora_A.grad, lora_B.grad]


def _assert_threads_match_serial(backend, device, rounds):
    """Threads first (racing to compile and tune the new shapes), then the same calls one by one."""
    problems = _problems(device)
    results = {index: [] for index in range(len(problems))}
    failures = []

    def work(index):
        try:
            for _ in range(rounds):
                results[index].append(_forward_backward(problems[index]))
        except Exception as err:  # reported below, with the thread it came from
            failures.append(f"thread {index}: {type(err).__name__}: {err}")

    with on_backend(backend, device):
        # Each thread runs in a copy of this context, so that the forced backend holds there too.
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, i)) for i in range(len(problems))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        serial = [_forward_backward(p) for p in problems]
    for index, expected in enumerate(serial):
        assert len(results[index]) == rounds
        for got in results[index]:
            for name, a, b in zip(("y", "dx", "dA", "dB"), got, expected):
                if device == "cpu":
                    assert torch.equal(a, b), f"thread {index} {name}"
                else:  # GPU atomics (split-K, dB) may reorder additions between calls
                    assert_close(a.cpu(), b.double().cpu(), torch.float32, f"thread {index} {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_concurrent_calls_from_threads_match_serial_calls_on_the_cpu(backend):
    _assert_threads_match_serial(backend, "cpu", rounds=2)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_GPU) for b in ("triton", "cuda")])
def test_concurrent_calls_from_threads_match_serial_calls_on_the_gpu(backend):
    _assert_threads_match_serial(backend, "cuda", rounds=20)
