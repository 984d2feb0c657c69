"""The implementations the benchmark puts side by side, all on the same inputs.

- `fusedlora-<backend>`: the fused op through each backend that can run here;
- `fusedlora-<triton|cuda>-<fused|workspace>`: a GPU backend with its large-M regime forced
  (M > 16), so that one GPU run settles each backend's regime dispatch by M;
- `reference`: the unfused computation (dequantize → F.linear → the LoRA matmuls), as PEFT and
  Unsloth compute it;
- `peft-bnb`: PEFT's LoRA on a bitsandbytes Linear4bit (nf4) or Linear8bitLt (int8);
- `peft-dense`: PEFT's LoRA on a dense bf16 nn.Linear;
- `floor`: plain bf16 F.linear without LoRA (its backward is dx = g·W only): what a cuBLAS
  matmul of the same shape costs, the bar fusedlora is measured against.
"""

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedlora.backends import REGIMES, Problem, backends, force_backend, force_regime
from fusedlora.backends.regimes import SMALL_M
from fusedlora.formats import quantize
from fusedlora.ops import fused_lora_linear

from .cases import Case

DTYPE = torch.bfloat16
SCALING = 2.0


@dataclass
class CaseTensors:
    """The inputs every provider of one case shares: dense W, adapters, activations, gradients."""

    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    xs: list
    grads: list

    @classmethod
    def random(cls, case: Case, device, copies: int, seed: int = 0) -> "CaseTensors":
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(DTYPE)

        return cls(randn(case.n, case.k, scale=0.02), randn(case.rank, case.k, scale=case.k ** -0.5),
                   randn(case.n, case.rank, scale=0.02), [randn(case.m, case.k) for _ in range(copies)],
                   [randn(case.m, case.n) for _ in range(copies)])


@dataclass
class Layer:
    """One provider built for one case: `forward(x) -> y`, the tensors that take gradients, the
    resident tensors (weights, adapters) that saved-activation accounting leaves out, the weight
    format the reference check must use, the bytes the weight occupies, and the scope every
    forward and backward of the layer runs in (a forced regime)."""

    forward: Callable
    trainable: list
    resident: list
    weight_fmt: str
    weight_bytes: int
    scope: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Provider:
    name: str
    why_not: Callable[[Case, torch.device], Optional[str]]
    build: Callable[[Case, CaseTensors, float], Layer]  # (case, tensors, dropout) -> Layer
    per_format: bool = True  # False: the same for every format, measured once per shape, M and rank


def _adapters(tensors: CaseTensors) -> tuple:
    return tensors.lora_A.clone().requires_grad_(), tensors.lora_B.clone().requires_grad_()


def _fusedlora(backend: str, regime: Optional[str] = None) -> Provider:
    """The fused op on `backend`; with `regime`, the backend's large-M calls in that regime
    (forward and backward: the layer's scope), so each regime is timed apart."""

    def why_not(case: Case, device: torch.device) -> Optional[str]:
        if regime is not None and case.m <= SMALL_M:
            return f"M <= {SMALL_M} runs the small-M kernel, in no regime"
        problem = Problem(device, DTYPE, DTYPE, case.fmt, case.rank, case.k, case.n)
        known = {b.name: b for b in backends()}
        return known[backend].why_not(problem) if backend in known else f"no backend named {backend}"

    def build(case: Case, tensors: CaseTensors, dropout: float) -> Layer:
        weight = quantize(tensors.weight, case.fmt)
        lora_A, lora_B = _adapters(tensors)

        def forward(x):
            with force_backend(backend):  # its backward runs on the same backend (fusedlora.ops)
                return fused_lora_linear(x, weight, lora_A, lora_B, SCALING, dropout_p=dropout)

        scope = (lambda: force_regime(regime)) if regime else contextlib.nullcontext
        return Layer(forward, [lora_A, lora_B], [*weight.tensors(), lora_A, lora_B], case.fmt, weight.nbytes, scope)

    name = "reference" if backend == "reference" else f"fusedlora-{backend}"
    return Provider(f"{name}-{regime}" if regime else name, why_not, build)


def _peft_layer(base: nn.Module, tensors: CaseTensors, rank: int, dropout: float):
    import peft

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

    config = peft.LoraConfig(r=rank, lora_alpha=int(SCALING * rank), target_modules=["proj"], lora_dropout=dropout)
    layer = peft.get_peft_model(Holder(), config).base_model.model.proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(tensors.lora_A)
        lora_B.copy_(tensors.lora_B)
    return layer, [lora_A, lora_B]


def _missing(*modules: str) -> Optional[str]:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def _peft_bnb_why_not(case: Case, device: torch.device) -> Optional[str]:
    if case.fmt not in ("nf4", "int8"):
        return "bitsandbytes has no such format"
    return _missing("peft", "bitsandbytes")


def _peft_bnb_build(case: Case, tensors: CaseTensors, dropout: float) -> Layer:
    import bitsandbytes as bnb

    if case.fmt == "nf4":
        base = bnb.nn.Linear4bit(case.k, case.n, bias=False, quant_type="nf4", compress_statistics=True,
                                 compute_dtype=DTYPE)
    else:
        base = bnb.nn.Linear8bitLt(case.k, case.n, bias=False, has_fp16_weights=False, threshold=0.0)
    base.load_state_dict({"weight": tensors.weight.detach().cpu()})
    base = base.to(tensors.weight.device)  # bitsandbytes quantizes here
    stored = [t for key, t in base.state_dict().items() if isinstance(t, torch.Tensor)]
    layer, trainable = _peft_layer(base, tensors, case.rank, dropout)  # PEFT keeps fp32 adapters on bitsandbytes layers
    return Layer(layer, trainable, [*stored, *trainable], case.fmt, sum(t.numel() * t.element_size() for t in stored))


def _peft_dense_build(case: Case, tensors: CaseTensors, dropout: float) -> Layer:
    base = nn.Linear(case.k, case.n, bias=False, device=tensors.weight.device, dtype=DTYPE)
    with torch.no_grad():
        base.weight.copy_(tensors.weight)
    base.requires_grad_(False)
    layer, trainable = _peft_layer(base, tensors, case.rank, dropout)
    return Layer(layer.to(DTYPE), trainable, [base.weight, *trainable], "dense", _nbytes(base.weight))


def _floor_build(case: Case, tensors: CaseTensors, dropout: float) -> Layer:
    weight = tensors.weight
    return Layer(lambda x: F.linear(x, weight), [], [weight], "dense", _nbytes(weight))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def providers(names: Optional[list] = None) -> list[Provider]:
    """Every provider (or those named), fusedlora's backends first, the floor last."""
    every = [_fusedlora(b.name) for b in backends() if b.name != "reference"]
    every += [_fusedlora(backend, regime) for backend in ("triton", "cuda") for regime in REGIMES]
    every += [
        _fusedlora("reference"),
        Provider("peft-bnb", _peft_bnb_why_not, _peft_bnb_build),
        Provider("peft-dense", lambda case, device: _missing("peft"), _peft_dense_build, per_format=False),
        Provider("floor", lambda case, device: None, _floor_build, per_format=False),
    ]
    if names is None:
        return every
    known = {p.name: p for p in every}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--providers: unknown {unknown}; choose from {sorted(known)}")
    return [known[name] for name in names]
