"""Tile configurations of the Triton kernels, apart from the kernel code.

The two GEMM-shaped kernels (forward, grad_x) are autotuned on the GPU among the candidates of
the device's architecture (Hopper: sm_90; Ampere: sm_80/86/89), keyed on the bucketed M, N, K,
the weight format and the padded rank; the choice is cached per key. The skinny kernels
(shrink, small_m, grad_u, grad_a) take a heuristic config. Under the Triton interpreter every
kernel runs one small config, since the interpreter's cost grows with programs × loop steps.
"""

from dataclasses import dataclass

import triton

from fusedlora.contract import FORMAT_IDS

# Kernel arguments that key the autotuning cache (M_BUCKET is next_power_of_2(M), capped).
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "FMT", "NESTED", "BLOCK_R"]


def _gemm(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Every candidate below compiles without spills and within a block's shared memory, on sm_90 and
# sm_80, under Triton 3.8 and 3.6 (`python -m fusedlora inspect --arch 90 80 --all-candidates
# --check` under each; tests/test_inspection.py checks the first ones in CI under both). The 4-bit
# formats' dequantization takes registers of its own, so they get lists of their own.

# Large tiles keep BLOCK_M >= 128 so one dequantized W tile serves many rows (docs/design.md §9).
# (128x256 and 256x128 tiles spill, and their grad_x needs more shared memory than a block has.)
HOPPER_GEMM = [
    _gemm(128, 128, 64, 8, 3),
    _gemm(128, 128, 64, 8, 4),
    _gemm(64, 128, 64, 4, 4),
    _gemm(64, 64, 64, 4, 4),
]
HOPPER_GEMM_4BIT = [
    _gemm(128, 128, 64, 8, 3),
    _gemm(128, 64, 32, 4, 3),
    _gemm(64, 128, 32, 4, 4),
    _gemm(64, 64, 64, 4, 4),
]
AMPERE_GEMM = [
    _gemm(128, 64, 32, 4, 4),
    _gemm(128, 128, 32, 8, 3),
    _gemm(64, 128, 32, 4, 4),
    _gemm(128, 64, 64, 4, 3),
    _gemm(64, 64, 64, 4, 3),
]
AMPERE_GEMM_4BIT = [
    _gemm(128, 64, 32, 4, 4),
    _gemm(64, 128, 32, 4, 4),
    _gemm(128, 64, 64, 4, 3),
    _gemm(64, 64, 64, 4, 3),
]


def is_four_bit(fmt_id: int) -> bool:
    """Whether the weight format `fmt_id` (the contract's FORMAT_IDS) is nf4 or fp4."""
    return fmt_id in (FORMAT_IDS["nf4"], FORMAT_IDS["fp4"])


def gemm_candidates(capability: tuple[int, int], four_bit: bool) -> list:
    """Autotuning candidates for the forward and grad_x GEMMs on a device of `capability`, for a
    4-bit (nf4, fp4) weight or another."""
    hopper = capability[0] >= 9
    if not four_bit:
        return HOPPER_GEMM if hopper else AMPERE_GEMM
    return HOPPER_GEMM_4BIT if hopper else AMPERE_GEMM_4BIT


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at most 8192): the autotuning key for M."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def padded_rank(r: int) -> int:
    """BLOCK_R: r padded to a power of two of at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(r))


@dataclass(frozen=True)
class SkinnyConfig:
    """Meta-parameters of one launch of a non-autotuned kernel."""

    meta: dict
    num_warps: int = 4
    num_stages: int = 2


# The interpreter's single config. The last three entries choose code paths that a GPU picks by
# itself (atomics unless deterministic, split-K and split-M when the grid is too small); tests set
# them to cover those paths on the CPU.
INTERPRETER = {
    "gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4},
    "shrink": SkinnyConfig({"BLOCK_M": 16, "BLOCK_K": 32}),
    "small_m": SkinnyConfig({"BLOCK_N": 16, "BLOCK_K": 32}),
    "gemv": SkinnyConfig({"BLOCK_N": 16, "BLOCK_K": 32}),
    "grad_u": SkinnyConfig({"BLOCK_M": 16, "BLOCK_N": 32}),
    "grad_a": SkinnyConfig({"BLOCK_M": 16, "BLOCK_K": 32}),
    "dequantize": SkinnyConfig({"BLOCK_N": 16, "BLOCK_K": 32}),
    "dx": SkinnyConfig({"BLOCK_M": 16, "BLOCK_K": 32}),
    "atomics": False,
    "small_m_split_k": 1,
    "grad_a_split_m": 1,
}


# The skinny configs below compile without register spills on sm_90 and sm_80 up to r = 64
# (`python -m fusedlora inspect --check`; tests/test_inspection.py keeps it so); the small-M
# kernel still spills at r >= 128 (docs/design.md §9).


def shrink_config(m: int, block_r: int) -> SkinnyConfig:
    # The shrink reads x once and is bandwidth-bound: rows sized to fill the SMs.
    return SkinnyConfig({"BLOCK_M": 64 if m >= 4096 else 32, "BLOCK_K": 64}, num_warps=4)


def small_m_config(n: int, k: int, sm_count: int, fmt_id: int, blocksize: int, block_r: int,
                   sixteen_bit_x: bool) -> tuple[SkinnyConfig, int]:
    """(config, split_k) for the small-M kernel: enough programs to keep every SM streaming W.
    BLOCK_K = 64 keeps a 4-bit tile within one absmax block per row (blocksize >= 64). A quantized
    W takes 128 rows a program, which halves the per-step cost of x and the LoRA product per
    weight element, where a step needs one absmax per row (as for the one-row kernel), K is a
    multiple of 64, r <= 16 and x is 16-bit; otherwise 64 rows, which those shapes need not to
    spill (tests/test_inspection.py compiles them). A dense W, which needs no decoding, keeps 64
    rows and more programs per SM."""
    one_absmax_per_row = not is_four_bit(fmt_id) or (k % blocksize == 0 and blocksize >= 64)
    wide = fmt_id != FORMAT_IDS["dense"] and one_absmax_per_row and k % 64 == 0 and block_r <= 16 and sixteen_bit_x
    block_n = 128 if wide else 64
    tiles = triton.cdiv(n, block_n)
    split_k = max(1, min(triton.cdiv(2 * sm_count, tiles), triton.cdiv(k, 512)))
    return SkinnyConfig({"BLOCK_N": block_n, "BLOCK_K": 64}, num_warps=4, num_stages=3), split_k


def gemv_config(n: int, k: int, sm_count: int, fmt_id: int, blocksize: int, block_r: int) -> tuple[SkinnyConfig, int]:
    """(config, split_k) for the one-row FMA kernel: 256 rows by 64-column steps when K is a
    multiple of 64, a step needs one absmax per row (4-bit with K a multiple of a blocksize >= 64,
    or int8/fp8) and r <= 32; otherwise fewer rows, which ragged steps, a per-byte absmax, odd K
    or a large rank need not to spill (`python -m fusedlora inspect` and tests/test_inspection.py
    check both); and enough K slices for about four programs per SM (W's reads in flight), each
    at least 256 columns long."""
    block_k = 64
    one_absmax_per_row = not is_four_bit(fmt_id) or (k % blocksize == 0 and block_k <= blocksize)
    if k % block_k == 0 and one_absmax_per_row and block_r <= 32:
        block_n = 256
    else:
        block_n = 32 if k % 2 else 64
    split_k = max(1, min(triton.cdiv(4 * sm_count, triton.cdiv(n, block_n)), triton.cdiv(k, 256)))
    return SkinnyConfig({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=1), split_k


def grad_u_config(m: int) -> SkinnyConfig:
    return SkinnyConfig({"BLOCK_M": 64 if m >= 2048 else 32, "BLOCK_N": 128}, num_warps=4)


def grad_a_config(m: int, k: int, sm_count: int) -> tuple[SkinnyConfig, int]:
    """(config, split_m): K tiles times row slices should cover the SMs twice."""
    block_k = 64
    split_m = max(1, min(triton.cdiv(2 * sm_count, triton.cdiv(k, block_k)), triton.cdiv(m, 256)))
    return SkinnyConfig({"BLOCK_M": 64, "BLOCK_K": block_k}, num_warps=4), split_m


def dequantize_config(fmt_id: int, blocksize: int) -> SkinnyConfig:
    """The workspace's dequantization: 128 rows by 64 columns, or for 4-bit weights by one absmax
    block when it is smaller, so that each row of a tile has one absmax (its packed codes are then
    16-byte loads of whole rows)."""
    block_k = min(64, blocksize) if is_four_bit(fmt_id) else 64
    return SkinnyConfig({"BLOCK_N": 128, "BLOCK_K": block_k}, num_warps=4)


def dx_config() -> SkinnyConfig:
    """The workspace regime's dx = drop'(du·A): bandwidth-bound, dx written once."""
    return SkinnyConfig({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4)
