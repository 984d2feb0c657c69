"""pytest-benchmark cases: `pytest bench/ --benchmark-only`. The fused op (each backend that can
run here), the reference and the floor, forward and forward+backward, on the device at hand: a
Llama-3-8B q_proj at M=2048 on a GPU, a tiny shape on a CPU. The device is synchronised after
every timed call, so each timing covers the kernels, not just their launch."""

import pytest
import torch

from fusedlora.benchmark.cases import Case
from fusedlora.benchmark.providers import CaseTensors, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = Case("q_proj", 2048, 4096, 4096, 16, "nf4") if DEVICE.type == "cuda" else Case("tiny", 64, 256, 384, 16, "nf4")
CHOSEN = [p for p in providers() if p.name.startswith("fusedlora-") or p.name in ("reference", "floor")]


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("provider", CHOSEN, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_layer(benchmark, provider, mode):
    reason = provider.why_not(CASE, DEVICE)
    if reason is not None:
        pytest.skip(f"{provider.name} cannot run here: {reason}")
    tensors = CaseTensors.random(CASE, DEVICE, copies=1)
    layer = provider.build(CASE, tensors, 0.0)
    x = tensors.xs[0].clone().requires_grad_()
    grad = tensors.grads[0]

    def step():
        y = layer.forward(x)
        if mode == "forward_backward":
            y.backward(grad)
        _synchronize()

    benchmark.extra_info.update(case=CASE.label, device=str(DEVICE))
    benchmark(step)
    if mode == "forward_backward":
        assert x.grad is not None and torch.isfinite(x.grad).all()
    else:
        assert x.grad is None
