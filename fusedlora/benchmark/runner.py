"""Measuring one case: every provider on the same inputs, checked against the reference first."""

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from fusedlora.backends import force_backend
from fusedlora.formats import quantize
from fusedlora.ops import fused_lora_linear

from .cases import Case
from .memory import peak_bytes, saved_activation_bytes
from .providers import SCALING, CaseTensors, Layer, Provider
from .timing import Clock

ROTATIONS = 4  # input copies cycled through the timed runs
CHECK_TOLERANCE = 3e-2  # bf16: a fraction of the reference's largest value, as tests/helpers.py
MEMORY_DROPOUT = 0.1  # saved bytes are read at a training dropout (fusedlora stores no mask)


@dataclass
class Measurement:
    provider: str
    case: dict
    status: str = "ok"  # ok | unavailable: … | disagrees: … | failed: …
    forward_ms: Optional[float] = None
    backward_ms: Optional[float] = None
    forward_backward_ms: Optional[float] = None
    spread_ms: dict = field(default_factory=dict)
    outliers: dict = field(default_factory=dict)  # phase -> runs far above the rest (timing.Timing.outliers)
    check_error: Optional[float] = None
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    weight_bytes: Optional[int] = None

    def to_json(self) -> dict:
        return asdict(self)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp(min=1e-30)
    return float((actual.float() - expected.float()).abs().max() / scale)


def _reference_outputs(tensors: CaseTensors, fmt: str) -> tuple:
    """y and dx of the reference backend on the first input copy, for weight format `fmt`."""
    weight = quantize(tensors.weight, fmt)
    x = tensors.xs[0].clone().requires_grad_()
    with force_backend("reference"):
        y = fused_lora_linear(x, weight, tensors.lora_A, tensors.lora_B, SCALING)
    y.backward(tensors.grads[0])
    return y.detach(), x.grad


class CaseRunner:
    """Measures the providers of one case; format-independent providers are measured once. Each
    provider is checked without dropout (the reference has no other mask to agree with) and timed
    at `dropout` (the adapter's dropout probability; 0 by default)."""

    def __init__(self, clock: Clock, providers: list, dropout: float = 0.0):
        self.clock = clock
        self.dropout = dropout
        self.providers = providers
        self._shared: dict = {}

    def run(self, case: Case) -> list[Measurement]:
        tensors = CaseTensors.random(case, self.clock.device, ROTATIONS)
        references: dict = {}
        results = []
        for provider in self.providers:
            key = (provider.name, case.shape, case.m, case.rank)
            if not provider.per_format and key in self._shared:
                results.append(Measurement(**{**self._shared[key].to_json(), "case": dict(case.__dict__)}))
                continue
            measurement = self._measure(provider, case, tensors, references)
            if not provider.per_format:
                self._shared[key] = measurement
            results.append(measurement)
        return results

    def _measure(self, provider: Provider, case: Case, tensors: CaseTensors, references: dict) -> Measurement:
        result = Measurement(provider.name, dict(case.__dict__))
        reason = provider.why_not(case, self.clock.device)
        if reason is not None:
            result.status = f"unavailable: {reason}"
            return result
        try:
            layer = provider.build(case, tensors, 0.0)
            result.weight_bytes = layer.weight_bytes
            if provider.name != "floor":
                if layer.weight_fmt not in references:
                    references[layer.weight_fmt] = _reference_outputs(tensors, layer.weight_fmt)
                result.check_error = self._check(layer, tensors, *references[layer.weight_fmt])
                if result.check_error > CHECK_TOLERANCE:
                    result.status = f"disagrees: error {result.check_error:.3g} > {CHECK_TOLERANCE} of the reference"
                    return result
            self._time(provider.build(case, tensors, self.dropout) if self.dropout else layer, case, tensors, result)
            with_dropout = provider.build(case, tensors, MEMORY_DROPOUT)
            x = tensors.xs[0].clone().requires_grad_()
            with with_dropout.scope():
                result.saved_bytes = saved_activation_bytes(with_dropout.forward, x, with_dropout.resident)
        except Exception as err:  # one provider's failure is a result to report, not the end of the run
            result.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        return result

    @staticmethod
    def _check(layer: Layer, tensors: CaseTensors, y_ref, dx_ref) -> float:
        x = tensors.xs[0].clone().requires_grad_()
        with layer.scope():
            y = layer.forward(x)
            y.backward(tensors.grads[0])
        return max(_relative_error(y.detach(), y_ref), _relative_error(x.grad, dx_ref))

    def _time(self, layer: Layer, case: Case, tensors: CaseTensors, result: Measurement) -> None:
        xs = [x.clone().requires_grad_() for x in tensors.xs]
        grads = tensors.grads

        def clear(i):
            for t in (*layer.trainable, xs[i % ROTATIONS]):
                t.grad = None

        def forward(i):  # decode is inference: no graph; training keeps what backward needs
            with torch.set_grad_enabled(not case.decode):
                layer.forward(xs[i % ROTATIONS])

        with layer.scope():  # a forced regime holds for the backward passes too
            graphs = [layer.forward(x) for x in xs]
            timings = {
                "forward": self.clock.time(forward),
                "backward": self.clock.time(
                    lambda i: graphs[i % ROTATIONS].backward(grads[i % ROTATIONS], retain_graph=True), clear),
                "forward_backward": self.clock.time(
                    lambda i: layer.forward(xs[i % ROTATIONS]).backward(grads[i % ROTATIONS]), clear),
            }
            graphs.clear()  # free the retained graphs before the next measurement
            result.peak_bytes = peak_bytes(lambda: layer.forward(xs[0]).backward(grads[0]), self.clock.device)
        result.forward_ms = timings["forward"].median
        result.backward_ms = timings["backward"].median
        result.forward_backward_ms = timings["forward_backward"].median
        result.spread_ms = {name: timing.spread for name, timing in timings.items()}
        result.outliers = {name: timing.outliers for name, timing in timings.items() if timing.outliers}
