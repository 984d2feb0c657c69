"""The problems the benchmark measures: Llama-3-8B projections × rank × rows (M) × format."""

import re
from dataclasses import dataclass

# (in_features K, out_features N) of the Llama-3-8B projections.
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "kv_proj": (4096, 1024),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
CPU_SHAPES = {"tiny": (256, 384), "tiny_wide": (256, 1024)}
FORMATS = ("nf4", "int8", "fp8", "dense")
ROWS = (1, 16, 128, 2048, 8192)
RANKS = (16, 64)
DECODE_ROWS = 16  # up to here the weight bytes are the cost: report GB/s, above it TFLOP/s


@dataclass(frozen=True)
class Case:
    shape: str
    m: int
    k: int
    n: int
    rank: int
    fmt: str

    @property
    def label(self) -> str:
        return f"{self.shape} {self.k}->{self.n} M={self.m} r={self.rank} {self.fmt}"

    @property
    def decode(self) -> bool:
        return self.m <= DECODE_ROWS

    def headline_training(self, largest_m: int) -> bool:
        """Training at the largest M of a run with nf4: a headline case."""
        return self.m == largest_m and self.fmt == "nf4"

    @property
    def headline_decode(self) -> bool:
        """Decode with nf4 or int8: a headline case."""
        return self.decode and self.fmt in ("nf4", "int8")


def parse_shapes(spec: str) -> dict:
    """Shape names (q_proj, kv_proj, up_proj, down_proj, tiny, tiny_wide) or KxN, comma-separated."""
    known = {**LLAMA3_8B, **CPU_SHAPES}
    shapes = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item in known:
            shapes[item] = known[item]
        elif match := re.fullmatch(r"(\d+)x(\d+)", item):
            shapes[item] = (int(match.group(1)), int(match.group(2)))
        else:
            raise ValueError(f"--shapes: unknown shape {item!r}; use {sorted(known)} or KxN")
    return shapes


def default_cases(gpu: bool, quick: bool) -> list[Case]:
    """Headline cases first: training (M=8192, nf4, r=16), then decode, then the rest."""
    if not gpu:
        shapes = {"tiny": CPU_SHAPES["tiny"]} if quick else CPU_SHAPES
        rows, ranks, formats = ((1, 64) if quick else (1, 16, 128)), (16,), (("nf4",) if quick else ("nf4", "dense"))
    elif quick:
        shapes = {name: LLAMA3_8B[name] for name in ("q_proj", "down_proj")}
        rows, ranks, formats = (1, 2048, 8192), (16,), ("nf4", "dense")
    else:
        shapes, rows, ranks, formats = LLAMA3_8B, ROWS, RANKS, FORMATS
    return order_cases(build_cases(shapes, rows, ranks, formats))


def build_cases(shapes: dict, rows, ranks, formats) -> list[Case]:
    return [Case(name, m, k, n, r, fmt) for name, (k, n) in shapes.items() for m in rows for r in ranks for fmt in formats]


def order_cases(cases: list[Case]) -> list[Case]:
    """Training at the largest M with nf4 and the smallest rank first, then decode, then the rest."""
    largest = max(case.m for case in cases)

    def priority(case: Case):
        return (not case.headline_training(largest), not case.headline_decode, case.rank, case.fmt != "nf4", case.m,
                case.shape)

    return sorted(cases, key=priority)
