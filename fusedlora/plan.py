"""Memory per GPU of a LoRA run of a Llama-style decoder under FSDP2, before it is launched
(`python -m fusedlora plan`; docs/design.md §10).

The frozen base, the adapters, their gradients and AdamW's state are counted exactly as FSDP2
shards them (`fusedlora.storage`: dim 0 split as `torch.chunk` splits it; the rank with the
largest shards is reported); tests/test_distributed.py checks these against the bytes the ranks
hold. What FSDP2 gathers for compute and the activations are estimates, labelled as such.
"""

import math
from dataclasses import dataclass, fields

import torch

from .formats import quantize
from .storage import stored_form

GIB = 2**30
GPU_SIZES_GB = (24, 40, 48, 80, 141)
CUDA_CONTEXT_BYTES = GIB  # an assumption: the CUDA context and allocator slack on each GPU


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder: hidden size H, MLP size I, layers, vocabulary, attention heads."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    def projections(self) -> dict[str, tuple[int, int]]:
        """The seven LoRA targets of one block, as (out_features, in_features)."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


PRESETS = {
    "llama-3.2-1b": DecoderShape(2048, 8192, 16, 128256, 32, 8, tied_embeddings=True),
    "llama-3-8b": DecoderShape(4096, 14336, 32, 128256, 32, 8),
    "llama-3-70b": DecoderShape(8192, 28672, 80, 128256, 64, 8),
}


def largest_shard_rows(rows: int, world: int) -> int:
    """Rows of the largest of `world` dim-0 shards (FSDP2's split, `torch.chunk`'s)."""
    return math.ceil(rows / world)


def _sharded(shape: torch.Size, element_size: int, world: int) -> int:
    per_row = math.prod(shape[1:]) * element_size
    return largest_shard_rows(shape[0], world) * per_row


def sharded_weight_bytes(out_features: int, in_features: int, fmt: str, world: int, blocksize: int = 64,
                         double_quant: bool = True, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one frozen (out_features, in_features) weight's storage on the rank holding the
    largest shards; a 0-dim tensor (a buffer) is whole on every rank."""
    weight = quantize(torch.empty(out_features, in_features, device="meta", dtype=dtype), fmt, blocksize, double_quant)
    total = 0
    for tensor in weight.tensors():
        stored = stored_form(weight, tensor)
        if tensor.dim() == 0:
            total += stored.numel() * stored.element_size()
        else:
            total += _sharded(stored.shape, stored.element_size(), world)
    return total


def sharded_adapter_bytes(out_features: int, in_features: int, r: int, world: int, element_size: int = 4) -> int:
    """Bytes of one layer's A (r, in) and B (out, r) on the rank holding the largest shards."""
    return (_sharded(torch.Size((r, in_features)), element_size, world)
            + _sharded(torch.Size((out_features, r)), element_size, world))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by what holds them."""

    frozen_base: int
    embeddings_and_norms: int
    adapters: int
    gradients: int
    optimizer: int
    gathered_for_compute: int
    activations: int
    cuda_context: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def activation_bytes_per_token_layer(shape: DecoderShape, r: int) -> int:
    """An estimate of what one block saves for backward per token in bf16: the two RMSNorms'
    fp32 and bf16 copies (6H each), RoPE's q and k, SDPA's q, k, v and output, the MLP's gate,
    up, SiLU and product (4I), and r per LoRA projection (u)."""
    kv = shape.hidden // shape.heads * shape.kv_heads
    elements = 6 * shape.hidden + (shape.hidden + kv) + (2 * shape.hidden + 2 * kv) + 4 * shape.intermediate + 7 * r
    return 2 * elements


def plan_memory(shape: DecoderShape, fmt: str = "nf4", r: int = 16, world: int = 1, micro_batch: int = 1,
                seq_len: int = 2048, checkpointing: bool = True, blocksize: int = 64,
                double_quant: bool = True) -> MemoryPlan:
    """Per-GPU memory of LoRA on the seven projections of every block, base in `fmt`, bf16
    compute, fp32 adapters, AdamW, each block and the root `fully_shard`-ed over `world` GPUs."""
    block_base = sum(sharded_weight_bytes(n, k, fmt, world, blocksize, double_quant)
                     for n, k in shape.projections().values())
    block_adapters = sum(sharded_adapter_bytes(n, k, r, world) for n, k in shape.projections().values())
    block_norms = 2 * _sharded(torch.Size((shape.hidden,)), 2, world)
    embedding = _sharded(torch.Size((shape.vocab, shape.hidden)), 2, world)
    root = embedding * (1 if shape.tied_embeddings else 2) + _sharded(torch.Size((shape.hidden,)), 2, world)
    # Estimates: the root's weights stay gathered for the step (FSDP2 does not reshard the root
    # after forward); a block is gathered while it computes and the next one is prefetched.
    full_block = (sum(sharded_weight_bytes(n, k, fmt, 1, blocksize, double_quant) for n, k in shape.projections().values())
                  + sum(sharded_adapter_bytes(n, k, r, 1, element_size=2) for n, k in shape.projections().values()))
    full_root = shape.vocab * shape.hidden * 2 * (1 if shape.tied_embeddings else 2)
    tokens = micro_batch * seq_len
    per_layer = tokens * activation_bytes_per_token_layer(shape, r)
    saved = (shape.layers * tokens * 2 * shape.hidden + 2 * per_layer) if checkpointing else shape.layers * per_layer
    logits = tokens * shape.vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    return MemoryPlan(frozen_base=shape.layers * block_base, embeddings_and_norms=root + shape.layers * block_norms,
                      adapters=shape.layers * block_adapters, gradients=shape.layers * block_adapters,
                      optimizer=2 * shape.layers * block_adapters, gathered_for_compute=full_root + 2 * full_block,
                      activations=saved + logits, cuda_context=CUDA_CONTEXT_BYTES)


_LABELS = {"frozen_base": "frozen base (shards)", "embeddings_and_norms": "embeddings, head, norms (shards)",
           "adapters": "adapters, fp32 (shards)", "gradients": "adapter gradients (shards)",
           "optimizer": "AdamW state (shards)", "gathered_for_compute": "gathered for compute (estimate)",
           "activations": "activations + logits (estimate)", "cuda_context": "CUDA context (assumed)"}


def format_plan(name: str, shape: DecoderShape, fmt: str, r: int, world: int, micro_batch: int, seq_len: int,
                blocksize: int = 64, double_quant: bool = True) -> str:
    """The plan with and without activation checkpointing, as a table in GiB, and the GPU sizes
    it fits."""
    plans = {ckpt: plan_memory(shape, fmt, r, world, micro_batch, seq_len, ckpt, blocksize, double_quant)
             for ckpt in (True, False)}
    lines = [f"{name}: {fmt} base, r={r}, {world} GPU(s) under FSDP2, micro-batch {micro_batch} x {seq_len} tokens",
             f"per GPU, GiB                          {'checkpointing':>14} {'none':>8}"]
    for field in fields(MemoryPlan):
        values = [getattr(plans[ckpt], field.name) / GIB for ckpt in (True, False)]
        lines.append(f"  {_LABELS[field.name]:<36}{values[0]:>14.2f} {values[1]:>8.2f}")
    lines.append(f"  {'total':<36}{plans[True].total / GIB:>14.2f} {plans[False].total / GIB:>8.2f}")
    for ckpt, label in ((True, "with activation checkpointing"), (False, "without")):
        fits = [f"{size} GB" for size in GPU_SIZES_GB if plans[ckpt].total <= size * 10**9]
        lines.append(f"fits {label}: {', '.join(fits) if fits else f'none of {GPU_SIZES_GB} GB'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m fusedlora plan`: print `format_plan` for a preset or a custom decoder."""
    import argparse

    from .checks import check_quant
    from .formats.fourbit import check_blocksize

    parser = argparse.ArgumentParser(prog="python -m fusedlora plan",
                                     description="memory per GPU of a LoRA run under FSDP2, before launching it")
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama-3-8b",
                        help="a preset decoder (default llama-3-8b); the size flags below override its fields")
    for flag in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads"):
        parser.add_argument(f"--{flag}", type=int, help=f"the decoder's {flag.replace('-', ' ')}")
    parser.add_argument("--quant", default="nf4", help="the frozen base's format: nf4, fp4, int8, fp8 or dense")
    parser.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    parser.add_argument("--no-double-quant", action="store_true", help="4-bit absmax kept in fp32, not nested")
    parser.add_argument("--r", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--world", type=int, default=1, help="GPUs sharding the model (default 1)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    args = parser.parse_args(argv)
    try:
        check_quant(args.quant)
        if args.quant in ("nf4", "fp4"):
            check_blocksize(args.blocksize)
    except ValueError as err:
        parser.error(str(err))
    for name in ("r", "world", "micro_batch", "seq_len", "blocksize"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    base = PRESETS[args.model]
    overrides = {field: getattr(args, field) for field in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads")
                 if getattr(args, field) is not None}
    for field, value in overrides.items():
        if value < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")
    shape = DecoderShape(**{**base.__dict__, **overrides})
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        parser.error(f"--hidden ({shape.hidden}) must be a multiple of --heads ({shape.heads}), "
                     f"and --heads of --kv-heads ({shape.kv_heads})")
    name = args.model if not overrides else f"{args.model} with {overrides}"
    print(format_plan(name, shape, args.quant or "dense", args.r, args.world, args.micro_batch, args.seq_len,
                      args.blocksize, not args.no_double_quant))
    return 0
