"""An analytic model that turns a kernel's compiled main loop into an estimated time. A MODEL:
every figure it gives is an estimate, and is printed as one.

Assumptions (a GPU run replaces each one it measures; bench/gpu_check.sh records the model's
estimate beside each measured figure so the error is known):
- Issue: an SM issues at most 4 warp instructions per clock (one per scheduler); a kernel's
  instructions are its main loop's static count times its trips, plus the rest of its code once,
  per warp. Latency is assumed hidden (optimistic for one CTA per SM).
- Tensor cores: dense bf16/fp16 peak 4096 FLOP per SM per clock on sm_90 (989 TFLOP/s at the
  1.83 GHz boost clock of H100/H200 SXM), 2048 on sm_80. Calibration: a cuBLAS-class bf16 GEMM
  reaches `gemm_efficiency` of the peak at the sustained clock (0.75: about 710 TFLOP/s on
  H100/H200 SXM, what public measurements of large bf16 GEMMs report), so the model's dense
  Triton GEMM, whose loop issues far less than the tensor cores take, lands there.
- mma.sync (HMMA) on sm_90 reaches `mma_sync_fraction` of the wgmma rate (2/3: an assumption;
  public microbenchmarks of H100 put it at roughly 60-70%); on sm_80 it is the tensor-core path.
- FMAs: fp32 kernels without tensor cores (the CUDA backend's LoRA kernels) at `fp32_lanes_per_sm`
  FMAs per SM per clock (128 on sm_90, 64 on sm_80).
- Overlap: a loop that waits for its wgmma at once (wait depth 0) serializes its issue time with
  its tensor time (the warpgroup dequantizes or multiplies, not both); a deeper wait, or mma.sync
  (which other warps' instructions overlap), overlaps them (max).
- Memory: each operand read or written once at `copy_fraction` of the HBM peak (0.88, the
  fraction a device-to-device copy reaches on HBM3/HBM3e parts, until measured).
- Launches: `launch_seconds` each (2.5 µs).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sm_count: int
    clock_hz: float  # sustained under load
    tensor_flops_per_sm_clock: int  # dense bf16
    hbm_bytes_per_s: float
    shared_per_sm: int  # bytes a CTA set may use per SM
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    issue_per_sm_clock: int = 4
    fp32_lanes_per_sm: int = 128
    mma_sync_fraction: float = 1.0
    gemm_efficiency: float = 0.75
    copy_fraction: float = 0.88
    launch_seconds: float = 2.5e-6

    @property
    def tensor_flops(self) -> float:
        return self.sm_count * self.clock_hz * self.tensor_flops_per_sm_clock

    @property
    def fp32_flops(self) -> float:
        return self.sm_count * self.clock_hz * self.fp32_lanes_per_sm * 2

    @property
    def copy_bandwidth(self) -> float:
        return self.hbm_bytes_per_s * self.copy_fraction

    @property
    def gemm_flops(self) -> float:
        """What a cuBLAS-class bf16 GEMM reaches (the calibration)."""
        return self.tensor_flops * self.gemm_efficiency


GPUS = {
    90: Gpu("H200 SXM (model)", 90, 132, 1.755e9, 4096, 4.8e12, 233472, mma_sync_fraction=2 / 3),
    80: Gpu("A100 SXM 80GB (model)", 80, 108, 1.41e9, 2048, 2.039e12, 167936, fp32_lanes_per_sm=64),
}


def ctas_per_sm(gpu: Gpu, registers: int, warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in 256-register units), shared memory
    (1 KB reserved per CTA), threads and the CTA limit."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = gpu.registers_per_sm // (per_warp * warps) if registers else gpu.max_ctas_per_sm
    by_shared = gpu.shared_per_sm // (shared_bytes + 1024)
    by_threads = gpu.max_threads_per_sm // (warps * 32)
    return max(0, min(by_registers, by_shared, by_threads, gpu.max_ctas_per_sm))


@dataclass(frozen=True)
class KernelTime:
    """A MODEL estimate of one launch, in seconds, with its parts."""

    issue: float
    tensor: float
    memory: float
    overlapped: bool

    @property
    def total(self) -> float:
        compute = max(self.issue, self.tensor) if self.overlapped else self.issue + self.tensor
        return max(compute, self.memory)

    @property
    def bound(self) -> str:
        parts = {"issue": self.issue, "tensor": self.tensor, "memory": self.memory}
        return max(parts, key=parts.get)


def kernel_time(gpu: Gpu, *, warp_instructions: float, flops: float, bytes_moved: float, overlapped: bool,
                tensor_ops: dict) -> KernelTime:
    """The MODEL's time of one launch that issues `warp_instructions` in all, its main loop holding
    `tensor_ops` (full opcode -> count: HMMA is mma.sync, HGMMA wgmma)."""
    issue = warp_instructions / (gpu.issue_per_sm_clock * gpu.sm_count * gpu.clock_hz)
    mma_sync = any(op.startswith("HMMA") for op in tensor_ops)
    tensor_flops = gpu.gemm_flops * (gpu.mma_sync_fraction if mma_sync else 1.0)
    return KernelTime(issue, flops / tensor_flops, bytes_moved / gpu.copy_bandwidth, overlapped)


def bf16_linear_seconds(gpu: Gpu, m: int, n: int, k: int) -> float:
    """The MODEL's bare bf16 `F.linear` (M, K)·(N, K)ᵀ: cuBLAS-class FLOP rate or copy bandwidth."""
    return max(2.0 * m * n * k / gpu.gemm_flops, 2.0 * (m * k + n * k + m * n) / gpu.copy_bandwidth)
