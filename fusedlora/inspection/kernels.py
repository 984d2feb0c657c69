"""Each Triton kernel of the package as the headline cases launch it: compiled for the target,
its main loop counted, its work (trips, weight elements, FLOPs, bytes) and its MODEL time.

    record_case(case, gpu, regime)  → the launches of one forward + backward (or forward only, M <= 16)
    inspect_launch(launch, gpu)  → KernelReport
    library_gemm_time(call, gpu)  → the MODEL time of a cuBLAS GEMM of the workspace regime
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..backends import triton_launch
from ..backends.regimes import force_regime
from ..benchmark.cases import Case
from ..formats import quantize
from . import sass
from .compile import bound_arguments, compile_launch, specialize
from .model import Gpu, KernelTime, ctas_per_sm, kernel_time

DTYPE = torch.bfloat16
SCALING = 2.0
DROPOUT = 0.1  # training cases; decode is inference, where the LoRA dropout is off
SEED = 1234
WEIGHT_KERNELS = ("lora_forward_kernel", "lora_grad_x_kernel", "lora_small_m_kernel", "lora_gemv_kernel")


def weight_bytes(case: Case) -> int:
    """The bytes of `case`'s frozen weight in its format (computed on the meta device)."""
    return quantize(torch.empty((case.n, case.k), device="meta", dtype=DTYPE), case.fmt).nbytes


def record_case(case: Case, gpu: Gpu, regime: Optional[str] = None) -> list:
    """The Triton launches of `case` on `gpu` (meta tensors: nothing runs): forward and backward
    for training (M > 16) with dropout, the forward alone without it for decode; large M in `regime` ("fused",
    "workspace"; None: the launcher's choice). A cuBLAS GEMM is a `triton_launch.LibraryGemm`."""
    meta = torch.device("meta")
    x = torch.empty((case.m, case.k), device=meta, dtype=DTYPE)
    weight = quantize(torch.empty((case.n, case.k), device=meta, dtype=DTYPE), case.fmt)
    lora_A = torch.empty((case.rank, case.k), device=meta, dtype=DTYPE)
    lora_B = torch.empty((case.n, case.rank), device=meta, dtype=DTYPE)
    regime_scope = force_regime(regime) if regime else contextlib.nullcontext()
    with regime_scope, triton_launch.recording((gpu.arch // 10, gpu.arch % 10), gpu.sm_count) as record:
        dropout = 0.0 if case.decode else DROPOUT
        _, u = triton_launch.forward(x, weight, lora_A, lora_B, SCALING, None, dropout, SEED)
        if not case.decode:
            grad_y = torch.empty((case.m, case.n), device=meta, dtype=DTYPE)
            triton_launch.backward(grad_y, x, u, weight, lora_A, lora_B, SCALING, DROPOUT, SEED, True)
    return record.launches


@dataclass(frozen=True)
class Work:
    programs: int
    trips: int  # main-loop iterations per program
    weight_elements: int  # weight elements one iteration dequantizes (0: the kernel reads no W)
    flops: float
    bytes_moved: float


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def work_of(name: str, a: dict, grid: tuple) -> Work:
    """What one launch of kernel `name` does, from its bound arguments `a`."""
    programs = math.prod(grid)
    cdiv = lambda p, q: -(-p // q)  # noqa: E731
    weight = _nbytes(a.get("w_ptr"), a.get("scale_ptr"), a.get("nested_absmax_ptr"))
    if name == "dequantize_kernel":
        return Work(programs, 1, 0, 0.0, weight + a["N"] * a["K"] * a["out_ptr"].element_size())
    m, r = a.get("M", 1), a["R"]  # the one-row kernel has no M
    if name == "lora_forward_kernel":
        n, k = a["N"], a["K"]
        return Work(programs, cdiv(k, a["BLOCK_K"]), a["BLOCK_N"] * a["BLOCK_K"], 2.0 * m * n * (k + r),
                    _nbytes(a["x_ptr"], a["y_ptr"], a["u_ptr"], a["b_ptr"]) + weight)
    if name == "lora_grad_x_kernel":
        n, k = a["N"], a["K"]
        return Work(programs, cdiv(n, a["BLOCK_N"]), a["BLOCK_N"] * a["BLOCK_K"], 2.0 * m * k * (n + r),
                    _nbytes(a["g_ptr"], a["dx_ptr"], a["du_ptr"], a["a_ptr"]) + weight)
    if name in ("lora_small_m_kernel", "lora_gemv_kernel"):
        n, k = a["N"], a["K"]
        trips = cdiv(cdiv(k, a["BLOCK_K"]), a["SPLIT_K"])
        scratch = 2 * _nbytes(a["partial_ptr"], a["u_partial_ptr"])  # written once, read once
        return Work(programs, trips, a["BLOCK_N"] * a["BLOCK_K"], 2.0 * m * (n * k + k * r + n * r),
                    _nbytes(a["x_ptr"], a["y_ptr"], a["a_ptr"], a["b_ptr"]) + weight + scratch)
    if name == "lora_shrink_kernel":
        return Work(programs, cdiv(a["K"], a["BLOCK_K"]), 0, 2.0 * m * a["K"] * r,
                    _nbytes(a["x_ptr"], a["u_ptr"]) + (_nbytes(a["x_ptr"]) if a["x_copy_ptr"] is not None else 0))
    if name == "lora_grad_u_kernel":
        return Work(programs, cdiv(a["N"], a["BLOCK_N"]), 0, 4.0 * m * a["N"] * r, _nbytes(a["g_ptr"], a["b_ptr"]))
    if name == "lora_grad_a_kernel":
        trips = cdiv(cdiv(m, a["BLOCK_M"]), a["SPLIT_M"])
        return Work(programs, trips, 0, 2.0 * m * a["K"] * r, _nbytes(a["x_ptr"], a["da_ptr"]))
    if name == "lora_dx_kernel":
        return Work(programs, 1, 0, 2.0 * m * a["K"] * r, _nbytes(a["du_ptr"], a["a_ptr"], a["dx_ptr"]))
    raise ValueError(f"no work model for kernel {name!r}")


@dataclass(frozen=True)
class KernelReport:
    """One compiled launch: resources, main-loop counts (per warp, per iteration), work, MODEL time."""

    kernel: str
    specialization: tuple  # what the compiled code depends on: equal for two launches, the same code
    candidate: Optional[int]
    warps: int
    stages: int
    registers: int
    local_bytes: int  # spills and stack
    shared_bytes: int
    ctas_per_sm: int
    instructions: int  # the whole kernel, static
    loop: sass.LoopCounts
    work: Work
    time: KernelTime

    @property
    def per_element(self) -> Optional[float]:
        """Thread instructions of the main loop per dequantized weight element."""
        if not (self.work.weight_elements and self.loop.instructions):
            return None
        return self.loop.per_element(self.loop.instructions, self.warps, self.work.weight_elements)

    @property
    def scalar_loads_per_element(self) -> Optional[float]:
        """Global loads of <= 4 bytes per thread (gathers) per weight element, in the main loop."""
        if not (self.work.weight_elements and self.loop.instructions):
            return None
        return self.loop.per_element(self.loop.scalar_global_loads, self.warps, self.work.weight_elements)

    @property
    def per_mma(self) -> Optional[float]:
        mma = sum(self.loop.tensor_ops.values())
        return self.loop.instructions / mma if mma else None


def library_gemm_time(call, gpu: Gpu) -> KernelTime:
    """The MODEL's time of a cuBLAS GEMM (`triton_launch.LibraryGemm`): the cuBLAS-class FLOP rate
    or its bytes at copy bandwidth, whichever is slower (the calibration of `bf16_linear_seconds`)."""
    return KernelTime(0.0, 2.0 * call.m * call.n * call.k / gpu.gemm_flops, call.bytes_moved / gpu.copy_bandwidth,
                      True)


_COMPILED: dict = {}  # specialization -> (resources, instruction count, loop counts, warps, stages, shared)


def specialization_key(launch, arch: int) -> tuple:
    source, options = specialize(launch, arch)
    return (arch, launch.kernel.fn.__name__, repr(source.signature), repr(source.constants),
            repr(sorted(options.items())))


def _compiled_counts(launch, gpu: Gpu, key: tuple) -> tuple:
    """Compile and count once per distinct specialization `key` (shapes differ, the code often not)."""
    if key not in _COMPILED:
        compiled = compile_launch(launch, gpu.arch)
        text, usage = sass.disassemble(compiled.asm["cubin"])
        resources = sass.resource_usage(usage)
        instructions = sass.parse(text)
        loop = sass.count(sass.main_loop(instructions))
        _COMPILED[key] = (resources, len(instructions), loop, compiled.metadata.num_warps,
                          compiled.metadata.num_stages, compiled.metadata.shared + resources["static_shared"])
    return _COMPILED[key]


def inspect_launch(launch, gpu: Gpu) -> KernelReport:
    """Compile `launch` for `gpu`, read its SASS, and estimate its time (a MODEL)."""
    name = launch.kernel.fn.__name__
    key = specialization_key(launch, gpu.arch)
    resources, instructions, loop, warps, stages, shared = _compiled_counts(launch, gpu, key)
    work = work_of(name, bound_arguments(launch, gpu.arch), launch.grid)
    warp_instructions = work.programs * warps * (loop.instructions * work.trips + instructions - loop.static_instructions)
    overlapped = loop.wgmma_wait_depth != 0  # only a wgmma waited for at once stalls its warpgroup
    time = kernel_time(gpu, warp_instructions=warp_instructions, flops=work.flops, bytes_moved=work.bytes_moved,
                       overlapped=overlapped, tensor_ops=loop.tensor_ops)
    return KernelReport(name, key, launch.candidate, warps, stages, resources["registers"], resources["local_bytes"],
                        shared, ctas_per_sm(gpu, resources["registers"], warps, shared), instructions, loop,
                        work, time)
