"""Clocks and ceilings. On a GPU: CUDA events around each call, the L2 cache flushed before it
(so neither the weight nor the activations are served from L2), median of the timed runs after
warm-up. On a CPU: `time.perf_counter`, labelled as CPU timing. Runs far above the others
(beyond the upper quartile by 3 interquartile ranges, or by 1% of the median where the runs hardly
differ) are counted as outliers and reported; the median they hardly move is the figure."""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (an H200 has 60 MB)
OUTLIER_IQRS = 3.0


@dataclass(frozen=True)
class Timing:
    """Milliseconds of the timed runs."""

    runs: tuple

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        """Interquartile range, in ms."""
        if len(self.runs) < 4:
            return max(self.runs) - min(self.runs)
        quartiles = statistics.quantiles(self.runs, n=4)
        return quartiles[2] - quartiles[0]

    @property
    def outliers(self) -> int:
        """Runs beyond the upper quartile by more than 3 interquartile ranges, and by 1% of the
        median at least (0 under 4 runs)."""
        if len(self.runs) < 4:
            return 0
        upper = statistics.quantiles(self.runs, n=4)[2]
        margin = max(OUTLIER_IQRS * self.spread, 0.01 * self.median)
        return sum(run > upper + margin for run in self.runs)


class Clock:
    """Times a callable on one device."""

    def __init__(self, device: torch.device, warmup: int = 5, reps: int = 20):
        self.device = device
        self.warmup = warmup
        self.reps = reps
        self.gpu = device.type == "cuda"
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.gpu else None

    @property
    def label(self) -> str:
        return f"CUDA events, L2 flushed, median of {self.reps}" if self.gpu else f"CPU timing (perf_counter), median of {self.reps}"

    def time(self, fn: Callable, before: Optional[Callable] = None) -> Timing:
        """Run `before(i)` (untimed) then `fn(i)` (timed) for run i, warmup + reps times."""
        for i in range(self.warmup):
            if before:
                before(i)
            fn(i)
        self.synchronize()
        runs = []
        for i in range(self.reps):
            if before:
                before(i)
            if self.gpu:
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn(i)
                runs.append((time.perf_counter() - began) * 1e3)
        return Timing(tuple(runs))

    def synchronize(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)


def ceilings(clock: Clock) -> dict:
    """The device's measured copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate: the
    faster of the two layouts a linear layer multiplies in (x·Wᵀ forward, g·W backward), in bf16,
    the dtype of every case (a CPU may run one layout several times faster than the other)."""
    device = clock.device
    copy_bytes, size = (2 * 2**30, 8192) if clock.gpu else (64 * 2**20, 256)  # CPUs do bf16 slowly
    source = torch.empty(copy_bytes // 2, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    copy = clock.time(lambda i: target.copy_(source))
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    layouts = {"x·Wᵀ": clock.time(lambda i: torch.nn.functional.linear(a, b)), "g·W": clock.time(lambda i: a @ b)}
    rates = {name: 2 * size**3 / (timing.median * 1e-3) / 1e12 for name, timing in layouts.items()}
    return {
        "copy_gb_per_s": copy_bytes / (copy.median * 1e-3) / 1e9,
        "bf16_matmul_tflop_per_s": max(rates.values()),
        "bf16_matmul_tflop_per_s_by_layout": rates,
        "copy_bytes": copy_bytes,
        "matmul_size": size,
    }
