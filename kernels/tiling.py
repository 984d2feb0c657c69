"""Program-to-tile order shared by the GEMM-shaped kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP_M row tiles at a time (Triton's matmul
    tutorial order): consecutive programs reuse the same column tiles of W from L2."""
    per_group = GROUP_M * num_cols
    first_row = (pid // per_group) * GROUP_M
    group_rows = min(num_rows - first_row, GROUP_M)
    return first_row + (pid % per_group) % group_rows, (pid % per_group) // group_rows
