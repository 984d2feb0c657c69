"""`python -m fusedlora bench-model`: training steps of a whole Llama-style model, stack beside
stack: tokens per second, peak memory, and the share of the step in the LoRA linears.

One step: forward, loss, backward, AdamW on the adapters. LoRA on the seven projections, r = 16,
an nf4 base (bf16 compute) or PEFT's stacks built from the same weights and adapter values:
fusedlora (each backend that runs here), PEFT on bitsandbytes (QLoRA), PEFT on the dense bf16
base, torchtune's QLoRA layer on torchao's NF4 when torchao is installed, and the floor (the bf16 model without LoRA: forward, then backward for the input
gradients only, what a frozen base costs). Before anything is timed each stack's first loss is
checked against PEFT on the dense base; a stack that computes something else is not compared.
The JSON has the layer benchmark's schema (meta, ceilings, results).
"""

import argparse
import contextlib
import copy
import datetime
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from ..backends import backends
from ..backends.registry import BACKEND_ENV
from ..plan import PRESETS as SHAPES
from ..plan import DecoderShape
from .report import write_json
from .timing import Timing

RANK = 16
ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A stack's first-step logits may differ from the reference's (PEFT on the dense base, else
# fusedlora's PyTorch reference) by this share of what the LoRA term itself moves them (the
# reference's logits against the floor's, in norm): nf4 rounding moves them by a few percent of
# that (12% on the tiny preset), a LoRA term dropped or doubled by about 100%. (The loss alone is a weak
# witness: at a random start it hardly depends on the LoRA term's size.)
OUTPUT_TOLERANCE = 0.35
REFERENCES = ("peft-dense", "fusedlora-reference")


@dataclass(frozen=True)
class Preset:
    shape: DecoderShape
    seq_len: int
    micro_batch: int


PRESETS = {
    # One Llama-3-8B decoder block with its real sizes (a small vocabulary, so the block dominates).
    "llama-3-8b-block": Preset(replace(SHAPES["llama-3-8b"], layers=1, vocab=1024), 2048, 1),
    # Llama-3.2-1B, the whole model.
    "llama-1b": Preset(SHAPES["llama-3.2-1b"], 2048, 1),
    # A tiny model for the CPU.
    "tiny": Preset(DecoderShape(64, 176, 2, 256, 4, 2), 64, 2),
}


def _llama(preset: Preset, device: torch.device):
    import transformers

    shape = preset.shape
    config = transformers.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                      intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                      max_position_embeddings=max(preset.seq_len, 64), attn_implementation="sdpa",
                                      tie_word_embeddings=shape.tied_embeddings)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.to(torch.bfloat16)


def _adapter_values(model: nn.Module) -> dict:
    """The same adapter values for every stack, in fp32, by module name: A with entries of
    size 1/sqrt(K), B sized so that the update s·B·A is as large as W's entries (a trained
    adapter's B is far from zero), so that the LoRA term moves the outputs well beyond nf4's
    rounding and a stack that drops or doubles it shows."""
    generator = torch.Generator().manual_seed(1)
    weight_std = model.config.initializer_range
    values = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            k, n = module.in_features, module.out_features
            b_std = weight_std * k ** 0.5 / (ALPHA / RANK * RANK ** 0.5)
            values[name] = (torch.randn(RANK, k, generator=generator) / k ** 0.5,
                            torch.randn(n, RANK, generator=generator) * b_std)
    return values


def _fusedlora(backend: str) -> Callable:
    def build(base: nn.Module, values: dict):
        import fusedlora

        model = fusedlora.apply_lora(base, TARGETS, r=RANK, alpha=ALPHA, quant="nf4")
        with torch.no_grad():
            for name, layer in fusedlora.lora_layers(model).items():
                layer.lora_A.weight.copy_(values[name][0])
                layer.lora_B.weight.copy_(values[name][1])
        return model, backend

    return build


def _peft(base: nn.Module, values: dict):
    import peft

    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
                key = name.removeprefix("base_model.model.")
                module.lora_A["default"].weight.copy_(values[key][0])
                module.lora_B["default"].weight.copy_(values[key][1])
    return model, None


def _peft_bnb(base: nn.Module, values: dict):
    import bitsandbytes as bnb

    from ..model import replace_submodule

    device = next(base.parameters()).device
    for name in values:
        linear = base.get_submodule(name)
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                                      compress_statistics=True, compute_dtype=torch.bfloat16)
        quantized.load_state_dict({"weight": linear.weight.detach().cpu()})
        replace_submodule(base, name, quantized.to(device))  # bitsandbytes quantizes on the move
    base.is_loaded_in_4bit = True  # PEFT wraps Linear4bit in its bitsandbytes LoRA layer only then
    return _peft(base, values)


class _TorchaoLoRALinear(nn.Module):
    """torchtune's QLoRA layer: the frozen weight a torchao NF4Tensor (blocks of 64, absmax
    quantized in blocks of 256 or the largest power of two dividing a small weight's count),
    `linear_nf4` for the base, fp32 adapters."""

    def __init__(self, linear: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # _TORCHAO_NF4

        super().__init__()
        blocks = linear.weight.numel() // 64
        scaler_block = min(256, blocks & -blocks)
        self.weight = nn.Parameter(to_nf4(linear.weight.detach(), 64, scaler_block), requires_grad=False)
        self.lora_A = nn.Parameter(lora_A.to(linear.weight.device))
        self.lora_B = nn.Parameter(lora_B.to(linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        lora = (x.float() @ self.lora_A.t()) @ self.lora_B.t() * (ALPHA / RANK)
        return linear_nf4(x, self.weight) + lora.to(x.dtype)


def _torchao_nf4(base: nn.Module, values: dict):
    from ..model import replace_submodule

    base.requires_grad_(False)
    for name, (lora_A, lora_B) in values.items():
        replace_submodule(base, name, _TorchaoLoRALinear(base.get_submodule(name), lora_A, lora_B))
    return base, None


def _floor(base: nn.Module, values: dict):
    """The frozen base asked what a LoRA stack asks of it: each targeted projection's output
    requires grad, as the LoRA term makes it, so backward computes the same input gradients."""
    base.requires_grad_(False)
    for name in values:
        base.get_submodule(name).register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    return base, None


def stacks() -> dict:
    """Every stack by name: fusedlora's backends, the peers, the floor."""
    every = {f"fusedlora-{backend.name}": _fusedlora(backend.name) for backend in backends()}
    every.update({"peft-bnb": _peft_bnb, "peft-dense": _peft, "torchao-nf4": _torchao_nf4, "floor": _floor})
    return every


def _why_not(name: str, device: torch.device) -> Optional[str]:
    import importlib.util

    needs = {"peft-bnb": ("peft", "bitsandbytes"), "peft-dense": ("peft",),
             "torchao-nf4": ("torchao", _TORCHAO_NF4)}.get(name, ())
    missing = [module for module in ("transformers", *needs) if not _importable(module)]
    if missing:
        return f"{', '.join(missing)} not installed"
    if name.startswith("fusedlora-"):
        from ..backends import Problem

        backend = next(b for b in backends() if b.name == name.removeprefix("fusedlora-"))
        if backend.name == "reference" and device.type == "cuda":
            return "the reference path on a GPU is not a stack anyone would train with"
        return backend.why_not(Problem(device, torch.bfloat16, torch.float32, "nf4", RANK, 4096, 4096))
    return None


_TORCHAO_NF4 = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _batches(preset: Preset, device: torch.device, count: int) -> list:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, preset.shape.vocab, (preset.micro_batch, preset.seq_len), generator=generator).to(device)
            for _ in range(count)]


def _lora_share(model: nn.Module, step: Callable, device: torch.device) -> Optional[float]:
    """The share of one step's operator time in fusedlora's LoRA ops (forward and backward are
    one custom op each); None for stacks without such an op boundary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    clock = "device" if device.type == "cuda" else "cpu"
    # an op's total includes what it calls (its kernels, on a GPU); the step's whole is the CPU
    # ops' self times, or on a GPU the kernels' (each is counted once, as a device event)
    lora = sum(getattr(e, f"{clock}_time_total") for e in events if e.key.startswith("fusedlora::lora_linear"))
    counted = [e for e in events if device.type != "cuda" or e.device_type == DeviceType.CUDA]
    total = sum(getattr(e, f"self_{clock}_time_total") for e in counted)
    return lora / total if lora and total else None


@contextlib.contextmanager
def _backend_everywhere(backend: Optional[str]):
    """Force `backend` through FUSEDLORA_BACKEND, which every thread reads: a checkpointed
    forward is recomputed during backward, which on a GPU runs on autograd's own thread, outside
    any `force_backend` block."""
    previous = os.environ.get(BACKEND_ENV)
    if backend:
        os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


def measure(preset_name: str, device: torch.device, names: list, steps: int, warmup: int,
            checkpointing: bool, seq_len: Optional[int] = None, micro_batch: Optional[int] = None,
            on_row: Optional[Callable[[list], None]] = None) -> list:
    """One row per stack (the layer benchmark's row keys where they apply); `on_row(rows)` after
    each. The floor and a reference always run: every other stack is checked against them."""
    preset = PRESETS[preset_name]
    preset = replace(preset, seq_len=seq_len or preset.seq_len, micro_batch=micro_batch or preset.micro_batch)
    base = _llama(preset, device)
    values = _adapter_values(base)
    batches = _batches(preset, device, warmup + steps)
    tokens = preset.micro_batch * preset.seq_len
    case = {"shape": preset_name, "m": tokens, "rank": RANK, "fmt": "nf4", "model": True, "seq_len": preset.seq_len,
            "micro_batch": preset.micro_batch, "checkpointing": checkpointing, "layers": preset.shape.layers}
    rows, outputs = [], {}
    order = {"peft-dense": 0, "floor": 1, "fusedlora-reference": 2}  # the references and the floor first
    ordered = sorted(dict.fromkeys([*REFERENCES, "floor", *names]), key=lambda name: order.get(name, len(order)))
    for name in tqdm(ordered, desc="stacks", unit="stack"):
        row = {"provider": name, "case": case, "status": "ok"}
        rows.append(row)
        reason = _why_not(name, device)
        if reason and name == "fusedlora-reference" and "peft-dense" not in outputs:
            reason = None  # no PEFT: the PyTorch path is the reference, even on a GPU
        if reason:
            row["status"] = f"unavailable: {reason}"
            continue
        model = optimizer = None
        try:
            baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            model, backend = stacks()[name](copy.deepcopy(base), values)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

            def step(ids, keep=None):
                with _backend_everywhere(backend):
                    out = model(input_ids=ids, labels=ids)
                    out.loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if keep is not None:
                    keep.update(loss=out.loss.item(), logits=out.logits.detach().to("cpu", torch.bfloat16))

            checked = {}
            step(batches[0], checked)
            row["first_loss"] = checked["loss"]
            if name in (*REFERENCES, "floor"):
                outputs[name] = checked["logits"]
            problem = _output_check(name, {**outputs, name: checked["logits"]}, row)
            if problem:
                row["status"] = problem
                continue
            for ids in batches[1:warmup]:
                step(ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            runs = []
            for ids in batches[warmup:]:
                started = time.perf_counter()
                step(ids)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                runs.append((time.perf_counter() - started) * 1e3)
            timing = Timing(tuple(runs))
            row.update(step_ms=timing.median, spread_ms=timing.spread, outliers=timing.outliers,
                       tokens_per_s=tokens / (timing.median * 1e-3),
                       peak_bytes=torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None)
            try:
                row["lora_share"] = _lora_share(model, lambda: step(batches[-1]), device) if backend else None
            except Exception as error:  # the timing stands without the profile
                row["lora_share_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        except Exception as error:  # one stack failing is a row saying so, not a lost run
            row["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
        finally:
            model = optimizer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_row is not None:
                on_row(_ratios(rows))
    return _ratios(rows)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.float() - b.float()))


def _output_check(name: str, outputs: dict, row: dict) -> Optional[str]:
    """Why stack `name`'s first logits (`outputs[name]`) cannot be compared: "disagrees" when
    they are not the reference's, "unchecked" when no reference or floor ran; None when they
    agree, and for the floor and the first reference."""
    reference = next((r for r in REFERENCES if r in outputs and r != name), None)
    if name == "floor" or (name in REFERENCES and reference is None):
        return None
    if reference is None or "floor" not in outputs:
        return "unchecked: neither PEFT on the dense base nor the PyTorch path, or not the floor, ran to check it against"
    effect = _distance(outputs[reference], outputs["floor"])
    row["check_error"] = _distance(outputs[name], outputs[reference]) / effect
    if row["check_error"] <= OUTPUT_TOLERANCE:
        return None
    return (f"disagrees: first-step logits {row['check_error']:.0%} of the LoRA term's effect away from "
            f"{reference}'s (over {OUTPUT_TOLERANCE:.0%}); first loss {row['first_loss']:.6f}")


def _ratios(rows: list) -> list:
    by_name = {row["provider"]: row for row in rows if row["status"] == "ok"}
    for row in by_name.values():
        if "floor" in by_name:
            row["times_floor"] = row["step_ms"] / by_name["floor"]["step_ms"]
        row["speedup_vs"] = {peer: by_name[peer]["step_ms"] / row["step_ms"]
                             for peer in ("peft-bnb", "peft-dense") if peer in by_name and peer != row["provider"]}
    return rows


def table(rows: list, device_label: str) -> str:
    """The rows as text: tokens/s (median, IQR as a share), peak memory, ratios, LoRA share."""
    lines = [f"{rows[0]['case']['shape']}: micro-batch {rows[0]['case']['micro_batch']} x {rows[0]['case']['seq_len']} "
             f"tokens, r={RANK}, nf4, activation checkpointing {'on' if rows[0]['case']['checkpointing'] else 'off'}; "
             f"{device_label}",
             f"{'stack':<20}{'tokens/s':>11}{'spread':>8}{'peak GiB':>10}{'x floor':>9}{'vs peft-bnb':>12}"
             f"{'LoRA share':>11}  first loss"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['provider']:<20}{row['status']}")
            continue
        peak = f"{row['peak_bytes'] / 2**30:.2f}" if row.get("peak_bytes") is not None else "n/a"
        versus = row["speedup_vs"].get("peft-bnb")
        share = row.get("lora_share")
        lines.append(f"{row['provider']:<20}{row['tokens_per_s']:>11.0f}{row['spread_ms'] / row['step_ms']:>7.1%} "
                     f"{peak:>9}{row.get('times_floor', float('nan')):>9.2f}"
                     f"{(f'{versus:.2f}x' if versus else 'n/a'):>12}{(f'{share:.0%}' if share is not None else 'n/a'):>11}"
                     f"  {row['first_loss']:.5f}")
    lines.append("x floor: step time over the bf16 model's without LoRA (lower is better); vs peft-bnb: its step "
                 "time over this stack's; LoRA share: fusedlora's ops in the profiled step (n/a: no op boundary)")
    return "\n".join(lines)


def plot(path, rows: list) -> bool:
    """Tokens per second by stack, a bar each. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return False
    figure, axis = plt.subplots(figsize=(1.6 * len(ok) + 2, 3.4))
    axis.bar([row["provider"] for row in ok], [row["tokens_per_s"] for row in ok],
             yerr=[row["tokens_per_s"] * row["spread_ms"] / row["step_ms"] for row in ok])
    axis.set_ylabel("training tokens / s")
    axis.set_title(f"{ok[0]['case']['shape']}, seq {ok[0]['case']['seq_len']} x {ok[0]['case']['micro_batch']}",
                   fontsize=9)
    axis.tick_params(axis="x", labelsize=7, rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None) -> int:
    from .cli import _commit, _versions

    parser = argparse.ArgumentParser(prog="python -m fusedlora bench-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: llama-3-8b-block on a GPU, tiny on a CPU")
    parser.add_argument("--stacks", help=f"comma-separated (default all): {', '.join(stacks())}")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing, the checked first one included")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and the PNG")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    names = list(dict.fromkeys(args.stacks.split(","))) if args.stacks else list(stacks())
    unknown = sorted(set(names) - set(stacks()))
    if unknown:
        parser.error(f"--stacks: unknown {unknown}; choose from {list(stacks())}")
    for flag in ("steps", "warmup", "seq_len", "micro_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    preset = args.preset or ("llama-3-8b-block" if device.type == "cuda" else "tiny")
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}), CPU timing"
    meta = {"commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": label, "versions": _versions(), "timing": f"perf_counter around synchronized steps, median of "
            f"{args.steps}", "benchmark": "whole model", "argv": argv if argv is not None else [], "complete": False}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-model-{preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{device.type}"
    # written after every stack, so that a run stopped from outside keeps what it measured
    rows = measure(preset, device, names, args.steps, args.warmup, args.checkpointing, args.seq_len,
                   args.micro_batch, on_row=lambda rows: write_json(stem.with_suffix(".json"), meta, {}, rows))
    meta["complete"] = True
    write_json(stem.with_suffix(".json"), meta, {}, rows)
    plotted = plot(stem.with_suffix(".png"), rows)
    print(table(rows, label))
    print(f"\nwrote {stem}.json" + (f" and {stem}.png" if plotted else ""))
    wrong = [row["provider"] for row in rows if row["status"].startswith(("disagrees", "unchecked", "failed"))]
    measured = [row for row in rows if row["status"] == "ok" and row["provider"] in names]
    if wrong or not measured:
        print(f"bench-model: {'not compared: ' + ', '.join(wrong) if wrong else 'no requested stack ran'}")
        return 1
    return 0
