"""The CUDA C++ kernels of csrc/ compiled for a GPU this machine may not have, counted from their
SASS, and a MODEL of the CUDA backend's time in the headline cases.

    compiled_kernels(arch)  → {(kernel, template arguments): (SASS text, resource-usage text)}
    inspect(gpu, cases, case_estimate)  → {"kernels": [row per kernel], "cases": [MODEL estimate per case]}

The .cu files are compiled to cubins with nvcc, the extension's flags (fusedlora/toolkit.py) and
torch's (its half/bfloat16 macros and headers), once per source content, command, toolchain and
arch (cached under ~/.cache/fusedlora/sass; a snapshot of csrc/ is what is hashed and compiled).
The bf16 instantiations are the headline cases' (the FMA small-M kernel takes any activation dtype at run time).

The kernels' tiles are read from csrc/ (their `constexpr` constants), so the work model follows
the source. Main loops: the GEMMs' (mma.sync where csrc/gemm_mma.cu takes the case, WMMA
otherwise) and the tensor-core small-M kernel's are the loops of their HMMA instructions, the FMA
small-M kernel's and the dequantization's the loops of their 16-byte weight loads (see
`sass.main_loop`); the dense FMA small-M kernel (one loop per dense dtype, chosen at run time)
and the LoRA kernels (nested loops) have none that counts per element, so the MODEL times them by
their bytes and FMAs alone (a lower bound) and the budgets hold their resources only. A training
case is estimated in each large-M regime (csrc/lora_ops.cpp's: "fused", the GEMM kernels;
"workspace", W dequantized and ATen's cuBLAS GEMMs, timed as the Triton backend's are by
`library_gemm_time`). The torch operations around the kernels (fills, dtype copies, the partials'
sums) count as launches (`HOST_LAUNCHES`), their bytes not.
"""

import concurrent.futures
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

from ..backends.regimes import CUDA_WORKSPACE_MIN_M, REGIMES, large_m_regime
from ..backends.triton_launch import LibraryGemm
from ..benchmark.cases import Case
from ..extension import CSRC
from ..toolkit import NVCC_FLAGS, point_cuda_home
from . import sass
from .kernels import KernelReport, Work, library_gemm_time, weight_bytes
from .model import Gpu, KernelTime, ctas_per_sm, kernel_time

FORMAT_IDS = {"dense": 0, "int8": 1, "fp8": 2, "nf4": 3, "fp4": 4}  # csrc/types.h's WeightFormat
FORWARD, GRAD_X = 0, 1  # csrc/gemm_epilogue.cuh's Mode
COPIES_X = "copies x"  # the workspace regime's shrink: it writes x's copy into [x | u] too
# The torch operations csrc/lora_ops.cpp launches around the kernels (bf16 activations and adapters):
# the small-M forward none (one launch); the fused forward: A and B to fp32, u back to bf16; the
# workspace forward: A to fp32, s·B and its copy into the workspace, u into [x | u], u back to
# bf16; backward (both regimes): dA's and dB's zero fills, the dB partials' fill, A, u and B to
# fp32, the two partial sums, dA and dB back to bf16.
HOST_LAUNCHES = {"small_m": 0, "fused": 3, "workspace": 5, "backward": 10}
_MANGLED = re.compile(r"\d+(gemm_kernel|gemm_mma_kernel|small_m_kernel|small_m_mma_kernel|dequantize_kernel|"
                      r"shrink_kernel|grad_u_kernel|grad_a_kernel|lora_dx_kernel)I(.*?)EEv")
_TEMPLATE_ARGUMENT = re.compile(r"13__nv_bfloat16|6__half|f|Li(\d+)E|Lb([01])E")
_TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def constant(source: str, name: str) -> int:
    """The integer `constexpr` `name` of csrc/`source` (a literal, else an error)."""
    match = re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", (CSRC / source).read_text())
    if not match:
        raise ValueError(f"csrc/{source} has no literal constexpr {name}: update fusedlora/inspection/cuda.py")
    return int(match.group(1))


def _demangle(mangled: str):
    """(kernel, template arguments) of a mangled kernel name: ("gemm_kernel", ("bf16", 3, 0)),
    ("small_m_kernel", (3, 1, True))."""
    match = _MANGLED.search(mangled)
    if not match:
        return None
    arguments = tuple(int(m.group(1)) if m.group(1) is not None else m.group(2) == "1" if m.group(2) is not None
                      else _TYPES[m.group(0)] for m in _TEMPLATE_ARGUMENT.finditer(match.group(2)))
    return match.group(1), arguments


def _nvcc_command(arch: int, source: Path, output: Path) -> list:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = [f"-I{path}" for path in include_paths(device_type="cuda")]
    python = f"-I{sysconfig.get_paths()['include']}"
    # C++20: what recent torch headers require; the standard does not change the device code.
    return ["nvcc", "-cubin", f"-arch=sm_{arch}", "-std=c++20", *NVCC_FLAGS, *COMMON_NVCC_FLAGS, *includes, python,
            str(source), "-o", str(output)]


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    """nvcc's release line, e.g. "Cuda compilation tools, release 13.0, V13.0.88"."""
    point_cuda_home()
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("inspecting the CUDA C++ kernels needs nvcc (the CUDA toolkit) on PATH; without it, "
                                "pass --backends triton")
    text = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    return next((line for line in text.splitlines() if "release" in line), text.strip())


def _cache_dir(arch: int, snapshot: dict) -> Path:
    """The cache folder of `snapshot` ({file name: bytes} of csrc/) compiled for sm_`arch` as now."""
    version = nvcc_version()  # also points CUDA_HOME at the toolkit, which torch's include paths need
    digest = hashlib.sha256()
    for name, content in sorted(snapshot.items()):
        digest.update(name.encode() + content)
    command = _nvcc_command(arch, Path("SOURCE"), Path("OUTPUT"))
    digest.update(repr((command, torch.__version__, version, sass.cuobjdump())).encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusedlora" / "sass"
    return root / f"sm_{arch}-{digest.hexdigest()[:16]}"


def _compile(arch: int, source: Path, folder: Path) -> None:
    cubin = folder / f"{source.stem}.cubin"
    built = subprocess.run(_nvcc_command(arch, source, cubin), capture_output=True, text=True)
    if built.returncode:
        raise RuntimeError(f"nvcc failed on csrc/{source.name} for sm_{arch}:\n{built.stderr[-4000:]}")
    text, usage = sass.disassemble(cubin.read_bytes())
    (folder / f"{source.stem}.sass").write_text(text)
    (folder / f"{source.stem}.usage").write_text(usage)
    cubin.unlink()


@functools.lru_cache(maxsize=None)
def compiled_kernels(arch: int) -> dict:
    """{(kernel, template arguments): (SASS text, resource-usage text)} of every csrc/*.cu kernel."""
    snapshot = {path.name: path.read_bytes() for path in CSRC.iterdir() if path.is_file()}
    folder = _cache_dir(arch, snapshot)
    stems = sorted(Path(name).stem for name in snapshot if name.endswith(".cu"))
    missing = [stem for stem in stems if not (folder / f"{stem}.usage").is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as copy:  # compile what was hashed, whatever happens to csrc/ meanwhile
            for name, content in snapshot.items():
                (Path(copy) / name).write_bytes(content)
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(missing), os.cpu_count() or 1))) as pool:
                list(pool.map(lambda stem: _compile(arch, Path(copy) / f"{stem}.cu", folder), missing))
    kernels = {}
    for stem in stems:
        texts = re.split(r"\n\s*Function : (\S+)\n", (folder / f"{stem}.sass").read_text())
        usages = dict(re.findall(r"Function (\S+?):\s*\n\s*(REG:[^\n]*)", (folder / f"{stem}.usage").read_text()))
        for mangled, text in zip(texts[1::2], texts[2::2]):
            name = _demangle(mangled)
            if name:
                if name in kernels:
                    raise ValueError(f"two kernels named {name} (csrc/{stem}.cu and another): rename one")
                kernels[name] = (text, usages[mangled])
    return kernels


def _cdiv(p: int, q: int) -> int:
    return -(-p // q)


def _threads(kernel: str) -> int:
    if kernel == "gemm_kernel":
        return constant("gemm.cu", "kThreads")
    if kernel == "gemm_mma_kernel":
        return constant("gemm_mma.cu", "kWarps") * 32
    if kernel in ("small_m_kernel", "small_m_mma_kernel"):
        return constant(f"{kernel[:-7]}.cu", "kWarps") * 32
    if kernel == "dequantize_kernel":
        return constant("dequantize.cu", "kThreads")
    return constant("lora.cu", "kThreads")


def _small_m_columns() -> int:
    """csrc/small_m.cu's kColumns: the columns of one block."""
    lanes = constant("small_m.cu", "kLanesPerColumn")
    return constant("small_m.cu", "kWarps") * (32 // lanes) * constant("small_m.cu", "kColumnsPerLane")


def _small_m_grid(case: Case, sm_count: int) -> tuple:
    """(groups, slices, steps per slice, K per step) of csrc/small_m.cu's launch on `case`
    (its launcher's `small_m_slice_steps`)."""
    chunk = 32 if case.fmt in ("nf4", "fp4") else 16  # weights per 16-byte chunk
    step = constant("small_m.cu", "kLanesPerColumn") * chunk
    groups, steps = max(1, _cdiv(case.n, _small_m_columns())), max(1, _cdiv(case.k, step))
    slice_steps = min(max(_cdiv(steps, _cdiv(4 * sm_count, groups)), 1), constant("small_m.cu", "kMaxSliceSteps"))
    return groups, _cdiv(steps, slice_steps), slice_steps, step


def _mma_step() -> int:
    """csrc/small_m_mma.cu's kStep: K per step, kChunksPerStep chunks of a row's 4 lanes."""
    return constant("small_m_mma.cu", "kChunksPerStep") * 4 * constant("small_m_mma.cu", "kLaneElements")


def _mma_grid(case: Case, sm_count: int) -> tuple:
    """(columns per block, groups, slices, steps per slice, K per step) of csrc/small_m_mma.cu's
    launch on `case` (its launcher's `slice_steps_of`)."""
    columns, step = constant("small_m_mma.cu", "kWarps") * constant("small_m_mma.cu", "kTile"), _mma_step()
    groups, steps, halves = _cdiv(case.n, columns), _cdiv(case.k, step), 1 if case.m <= 8 else 2
    most = constant("small_m_mma.cu", "kMaxSliceSteps") // halves
    slice_steps = min(max(_cdiv(steps, _cdiv(2 * sm_count, groups)), 1), most)
    return columns, groups, _cdiv(steps, slice_steps), slice_steps, step


def _dequantize_work(case: Case, sm_count: int) -> Work:
    """csrc/dequantize.cu's launch on `case`: blocks of kThreads runs of 32 weights of a row, each
    walking the rows a number of row groups apart (its launcher's grid); writes W in bf16."""
    threads, run = constant("dequantize.cu", "kThreads"), 32
    row_blocks = _cdiv(case.k // run, threads)
    groups = max(1, min(_cdiv(constant("dequantize.cu", "kBlocksPerSm") * sm_count, row_blocks), case.n, 65535))
    return Work(row_blocks * groups, _cdiv(case.n, groups), threads * run, 0.0, weight_bytes(case) + 2 * case.n * case.k)


def _weight_work(kernel: str, mode: int, case: Case, sm_count: int) -> Work:
    """What one launch of a weight-reading kernel does on `case` (bf16, the LoRA term at rank r): the
    small-M kernels also read A once per column group and B once, and write and read back their
    slices' fp32 partial sums."""
    m, n, k, r = case.m, case.n, case.k, case.rank
    if kernel == "dequantize_kernel":
        return _dequantize_work(case, sm_count)
    activations = 2 * m * (k + n)  # bf16 in and out
    if kernel in ("small_m_kernel", "small_m_mma_kernel"):
        if kernel == "small_m_mma_kernel":
            columns, groups, slices, slice_steps, step = _mma_grid(case, sm_count)
        else:
            (groups, slices, slice_steps, step), columns = _small_m_grid(case, sm_count), _small_m_columns()
        partials = 8 * slices * m * (n + groups * r) if slices > 1 else 0
        return Work(groups * slices, slice_steps, columns * step, 2.0 * m * n * (k + r),
                    activations + weight_bytes(case) + 2 * r * (k * groups + n) + partials)
    source = "gemm_mma.cu" if kernel == "gemm_mma_kernel" else "gemm.cu"
    tile, step = constant(source, "kTile"), constant(source, "kStep")
    reduce, outs = (k, n) if mode == FORWARD else (n, k)
    trips = _cdiv(reduce, step)
    if kernel == "gemm_mma_kernel":  # the last step after the loop, and grad_x's step before it if that ends past N
        trips -= 1 + (mode == GRAD_X and reduce % step != 0 and trips >= 2)
    return Work(_cdiv(m, tile) * _cdiv(outs, tile), trips, tile * step, 2.0 * m * outs * (reduce + r),
                activations + weight_bytes(case))


def _staging_trips() -> int:
    """Trips of the GEMM's staging loops per main-loop step: kStageTrips / kStageUnroll (csrc/gemm.cu)."""
    per_thread = constant("gemm.cu", "kTile") * constant("gemm.cu", "kStep") // constant("gemm.cu", "kThreads")
    return per_thread // constant("gemm.cu", "kStageUnroll")


def _grad_a_slices(m: int) -> int:
    """csrc/lora.cu's grad_a_slices: the dA partials written."""
    return max(1, min(constant("lora.cu", "kMaxSlices"), _cdiv(m, constant("lora.cu", "kRowsPerSlice"))))


def _lora_time(gpu: Gpu, kernel: str, case: Case, copies_x: bool) -> KernelTime:
    """The LoRA kernels (fp32 FMAs) by their bytes and FMAs alone: a lower bound. `copies_x`: the
    shrink also writes x's copy (the workspace regime)."""
    m, n, k, r = case.m, case.n, case.k, case.rank
    flops, moved = {
        "shrink_kernel": (2.0 * m * k * r, 2 * m * k * (2 if copies_x else 1) + 4 * (m * r + r * k)),
        "grad_u_kernel": (4.0 * m * n * r, 2 * m * n + 4 * (2 * m * r + 2 * n * r)),
        "grad_a_kernel": (2.0 * m * k * r, 2 * m * k + 4 * m * r + 4 * r * k * _grad_a_slices(m)),
        "lora_dx_kernel": (2.0 * m * k * r, 2 * m * k + 4 * (m * r + r * k)),
    }[kernel]
    return KernelTime(flops / gpu.fp32_flops, 0.0, moved / gpu.copy_bandwidth, True)


def _report(gpu: Gpu, key: tuple, case: Case, mode) -> KernelReport:
    """`mode`: the GEMM's (FORWARD, GRAD_X), COPIES_X for the workspace regime's shrink, else None."""
    kernel = key[0]
    text, usage = compiled_kernels(gpu.arch)[key]
    resources = sass.resource_usage(usage)
    instructions = sass.parse(text)
    inner_trips = _staging_trips() if kernel == "gemm_kernel" else 1
    loop = sass.count(sass.main_loop(instructions), inner_trips)
    warps = _threads(kernel) // 32
    ctas = ctas_per_sm(gpu, resources["registers"], warps, resources["static_shared"])
    if kernel in ("gemm_kernel", "gemm_mma_kernel", "small_m_kernel", "small_m_mma_kernel", "dequantize_kernel"):
        work = _weight_work(kernel, mode, case, gpu.sm_count)
        if loop.instructions:
            rest = len(instructions) - loop.static_instructions
            time = kernel_time(gpu, warp_instructions=work.programs * warps * (loop.instructions * work.trips + rest),
                               flops=work.flops, bytes_moved=work.bytes_moved, overlapped=True,
                               tensor_ops=loop.tensor_ops)
        else:  # the dense small-M kernel: no main loop to count (module docstring)
            time = KernelTime(0.0, 0.0, work.bytes_moved / gpu.copy_bandwidth, True)
    else:
        work, time = Work(1, 0, 0, 0.0, 0.0), _lora_time(gpu, kernel, case, mode == COPIES_X)
    return KernelReport(kernel, (gpu.arch, *key), None, warps, 1, resources["registers"], resources["local_bytes"],
                        resources["static_shared"], ctas, len(instructions), loop, work, time)


def _on_tensor_cores(case: Case) -> bool:
    """csrc/small_m_mma.cu's small_m_on_tensor_cores for `case` (bf16 x, W as `weight_bytes` builds it)."""
    step = _mma_step()
    return (case.m <= constant("kernels.h", "kTensorSmallMMaxRows") and case.k >= step and case.k % step == 0
            and case.rank <= constant("small_m_mma.cu", "kMaxRank"))


def _gemm_on_tensor_cores(case: Case) -> bool:
    """csrc/gemm_mma.cu's gemm_on_tensor_cores for `case` (bf16 x and g, W as `weight_bytes` builds it)."""
    step = constant("gemm_mma.cu", "kStep")
    return case.k >= step and case.k % step == 0 and case.n % 8 == 0


def _in_workspace(case: Case, regime: str) -> bool:
    """csrc/lora_ops.cpp's in_workspace (dequantize_takes) for a training `case` asked to run in
    `regime` (bf16 x, W as `weight_bytes` builds it: K a multiple of a run, 32 weights)."""
    run = constant("weight_chunks.cuh", "kRunChunks") * constant("weight_chunks.cuh", "kChunkElements")
    return regime == "workspace" and case.k >= run and case.k % run == 0


def _launches(case: Case, regime: str) -> list:
    """The CUDA backend's launches for `case` in `regime` (csrc/lora_ops.cpp's order): (kernel key,
    mode) per kernel, a `LibraryGemm` per cuBLAS GEMM."""
    fmt = FORMAT_IDS[case.fmt]
    m, n, k, r = case.m, case.n, case.k, case.rank
    most = constant("kernels.h", "kSmallMMaxRows")
    gemm = "gemm_mma_kernel" if _gemm_on_tensor_cores(case) else "gemm_kernel"
    dequantize = (("dequantize_kernel", ("bf16", fmt)), None)
    workspace = _in_workspace(case, regime)
    if _on_tensor_cores(case):  # one launch: one instruction per 8 rows of x, 4-bit absmax nested (the default)
        key = (fmt, "bf16", 1 if m <= 8 else 2, case.fmt in ("nf4", "fp4"))
        launches = [(("small_m_mma_kernel", key), None)]
    elif m <= most:  # one launch, unrolled for one row or for the most; 16-byte chunks but for dense W
        launches = [(("small_m_kernel", (fmt, 1 if m == 1 else most, case.fmt != "dense")), None)]
    elif workspace:  # y = [x | u] · [deq(W) | s·B]ᵀ
        launches = [dequantize, (("shrink_kernel", ("bf16",)), COPIES_X),
                    LibraryGemm(m, n, k + r, 2 * (m * (k + r) + n * (k + r) + m * n))]
    else:
        launches = [(("shrink_kernel", ("bf16",)), None), ((gemm, ("bf16", fmt, FORWARD)), FORWARD)]
    if not case.decode:
        launches += [(("grad_u_kernel", ("bf16",)), None), (("grad_a_kernel", ("bf16",)), None)]
        launches += ([(("lora_dx_kernel", ("bf16",)), None), dequantize,
                      LibraryGemm(m, k, n, 2 * (m * n + n * k + 2 * m * k))] if workspace
                     else [((gemm, ("bf16", fmt, GRAD_X)), GRAD_X)])
    return launches


def _host_launches(case: Case, regime: str) -> int:
    """The torch operations around the kernels of `case` (`HOST_LAUNCHES`)."""
    first = _launches(case, regime)[0]
    small_m = not isinstance(first, LibraryGemm) and first[0][0] in ("small_m_kernel", "small_m_mma_kernel")
    forward = HOST_LAUNCHES["small_m" if small_m else "workspace" if _in_workspace(case, regime) else "fused"]
    return forward + (0 if case.decode else HOST_LAUNCHES["backward"])


def row_key(key: tuple, fmt: str) -> str:
    """The budget key of a CUDA kernel: `cuda/<kernel>[/<mode>]/<format>`."""
    kernel, arguments = key
    if kernel in ("gemm_kernel", "gemm_mma_kernel"):
        return f"cuda/{kernel}/{'forward' if arguments[2] == FORWARD else 'grad_x'}/{fmt}"
    if kernel == "small_m_mma_kernel":  # one budget per instruction count per chunk: M <= 8 or M <= 16
        return f"cuda/{kernel}/m{8 * arguments[2]}/{fmt}"
    return f"cuda/{kernel}/{fmt}" if kernel in ("small_m_kernel", "dequantize_kernel") else f"cuda/{kernel}"


def inspect(gpu: Gpu, cases: list, case_estimate) -> dict:
    """Kernel rows and the CUDA backend's MODEL estimate (`case_estimate(case, gpu, seconds)`) per
    case: a training case in each large-M regime (backend "cuda-fused", "cuda-workspace") and once
    more as "cuda", in the regime the backend picks for its M (`regimes.large_m_regime` with
    `CUDA_WORKSPACE_MIN_M`)."""
    from .budgets import measured

    seen, kernels, estimates = set(), [], []
    capability = (gpu.arch // 10, gpu.arch % 10)
    for case in cases:
        for regime in ("fused",) if case.decode else REGIMES:
            seconds, by_bytes = _host_launches(case, regime) * gpu.launch_seconds, []
            for launch in _launches(case, regime):
                if isinstance(launch, LibraryGemm):
                    seconds += library_gemm_time(launch, gpu).total + gpu.launch_seconds
                    continue
                key, mode = launch
                report = _report(gpu, key, case, mode)
                seconds += report.time.total + gpu.launch_seconds
                if not report.loop.instructions:
                    by_bytes.append(key[0])
                name = row_key(key, case.fmt)
                if name not in seen:
                    seen.add(name)
                    kernels.append(dict(key=name, fmt=case.fmt, case=case.label, family="cuda", **measured(report)))
            estimate = {**case_estimate(case, gpu, seconds), "timed_by_bytes": by_bytes}
            if case.decode:
                estimates.append({**estimate, "backend": "cuda"})
                continue
            estimates.append({**estimate, "backend": f"cuda-{regime}"})
            if regime == large_m_regime(case.m, case.fmt, capability, True, CUDA_WORKSPACE_MIN_M):
                estimates.append({**estimate, "backend": "cuda", "regime": regime})
    return {"kernels": kernels, "cases": estimates}
