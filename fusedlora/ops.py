"""`fused_lora_linear`: the public op, its torch.library custom ops, fake impls and autograd.

Two custom ops carry the work, in the `fusedlora` namespace, with one argument order that every
backend (reference, Triton, CUDA) implements:

    fusedlora::lora_linear_fwd(x (M,K), w_tensors, w_format, w_shape, w_blocksize,
                               lora_A, lora_B, scaling, bias?, dropout_p, seed) -> (y (M,N), u (M,r), backend)
    fusedlora::lora_linear_bwd(grad_y, x, u, w_tensors, w_format, w_shape, w_blocksize,
                               lora_A, lora_B, scaling, dropout_p, seed, need_dx, backend) -> (dx, dA, dB)

The weight travels as its storage tensors plus format, shape and blocksize (custom ops take
tensors, not objects). Backward saves x, u and the seed, nothing the size of W (docs/design.md
§1), and `backend`, the number of the backend that ran the forward (a 0-d int64 CPU tensor, so
that compiled code carries the value of each call, not the one it was traced with): the backward
runs there, whatever is forced when it runs. A backend's own ops, such as the CUDA extension's,
have neither `backend`. `seed` is a 0-d int64 tensor so that a fresh seed per call does not
recompile compiled code.
"""

import contextlib
from typing import Optional

import torch

from .backends import Problem, backend_id, backend_with_id, force_regime, select_backend
from .backends.regimes import scoped_regime
from .checks import as_weight, check_lora_inputs
from .contract import fake_backward, fake_forward
from .dropout import SEED_LIMIT
from .formats import FrozenWeight

Tensor = torch.Tensor


def _chosen_backend(x, w_format, w_shape, lora_A, lora_B):
    problem = Problem(
        device=x.device,
        x_dtype=x.dtype,
        adapter_dtype=torch.promote_types(lora_A.dtype, lora_B.dtype),
        fmt=w_format,
        rank=lora_A.shape[0],
        in_features=w_shape[1],
        out_features=w_shape[0],
    )
    return select_backend(problem)


@torch.library.custom_op("fusedlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor,
    w_tensors: list[Tensor],
    w_format: str,
    w_shape: list[int],
    w_blocksize: int,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Optional[Tensor],
    dropout_p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    weight = FrozenWeight.from_tensors(w_format, w_tensors, w_shape, w_blocksize)
    backend = _chosen_backend(x, w_format, w_shape, lora_A, lora_B)
    y, u = backend.forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, int(seed))
    return y, u, torch.tensor(backend_id(backend.name), dtype=torch.int64)


@lora_linear_fwd.register_fake
def _fake_forward_with_backend(*args):
    return (*fake_forward(*args), torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("fusedlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    w_tensors: list[Tensor],
    w_format: str,
    w_shape: list[int],
    w_blocksize: int,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    need_dx: bool,
    backend: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs on `backend`, the forward's. dx is an empty tensor when `need_dx` is False (custom
    ops cannot return None)."""
    weight = FrozenWeight.from_tensors(w_format, w_tensors, w_shape, w_blocksize)
    grad_x, grad_A, grad_B = backend_with_id(int(backend)).backward(
        grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_p, int(seed), need_dx
    )
    return (grad_x if need_dx else x.new_empty((0,))), grad_A, grad_B


lora_linear_bwd.register_fake(fake_backward)


def _setup_context(ctx, inputs, output):
    x, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, bias, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, output[1], seed, output[2], lora_A, lora_B, *w_tensors)
    ctx.weight_meta = (w_format, w_shape, w_blocksize)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype
    # A regime forced by `force_regime` holds for this call's backward too, which autograd may run
    # on another thread (CUDA's device threads), where the forward's context variables are not set.
    ctx.regime = scoped_regime()


def _backward(ctx, grad_y, grad_u, grad_backend):
    x, u, seed, backend, lora_A, lora_B, *w_tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with force_regime(ctx.regime) if ctx.regime else contextlib.nullcontext():
        grad_x, grad_A, grad_B = lora_linear_bwd(
            grad_y.contiguous(), x, u, w_tensors, *ctx.weight_meta, lora_A, lora_B,
            ctx.scaling, ctx.dropout_p, seed, needs[0], backend,
        )
    grad_bias = grad_y.sum(0).to(ctx.bias_dtype) if needs[8] else None
    return (
        grad_x if needs[0] else None, [None] * len(w_tensors), None, None, None,
        grad_A if needs[5] else None, grad_B if needs[6] else None,
        None, grad_bias, None, None,
    )


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _autocast_inputs(x, lora_A, lora_B, bias):
    """Under torch.autocast, cast as autocast casts `nn.Linear`'s inputs: every floating tensor
    but float64 goes to the autocast dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, lora_A, lora_B, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(x), cast(lora_A), cast(lora_B), cast(bias)


def _seed_tensor(seed: Optional[int], dropout_p: float) -> Tensor:
    if seed is not None:
        return torch.tensor(seed, dtype=torch.int64)
    if dropout_p == 0.0:
        return torch.zeros((), dtype=torch.int64)
    return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64)


def fused_lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=None) -> Tensor:
    """y = x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ (+ bias), with its backward, through the best backend.

    x: (..., K) float; weight: a `FrozenWeight` of shape (N, K) or a float (N, K) tensor;
    lora_A: (r, K); lora_B: (N, r), in x's dtype or fp32; bias: (N,) or None (frozen unless it
    requires grad); scaling = 0 turns the adapter branch off entirely; dropout_p in [0, 1) applies
    to the LoRA input only; seed (int in [0, 2^32)) fixes the dropout mask, None draws one from
    torch's generator. Returns y: (..., N) in x's dtype. W gets no gradient.
    """
    weight = as_weight(weight)
    check_lora_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
    x, lora_A, lora_B, bias = _autocast_inputs(x, lora_A, lora_B, bias)
    y, _, _ = lora_linear_fwd(
        x.reshape(-1, x.shape[-1]), weight.tensors(), weight.fmt, list(weight.shape), weight.blocksize,
        lora_A, lora_B, float(scaling), bias, float(dropout_p), _seed_tensor(seed, dropout_p),
    )
    return y.view(*x.shape[:-1], weight.shape[0])
