"""Read a compiled kernel's SASS: its main loop, and what that loop spends per iteration.

The main loop is the backward branch's range (target .. branch) holding the most tensor-core
instructions (the shortest of equals: the innermost); in a kernel without tensor-core
instructions, the range holding the most 16-byte global loads (the longest of equals: a compiler
versions a loop on a uniform condition, such as a nested absmax, and the longest version is the
general one); in a kernel with neither, none. Counts are static: each instruction of the
loop body once, branches inside the body taken or not; NOPs (alignment padding) are left out; an
inner loop (a backward branch inside the body; one level) counts `inner_trips` times, the trip
count its kernel's source fixes. Counts are per warp and per iteration;
`LoopCounts.per_element` turns them into thread instructions per weight element.
"""

import functools
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Instruction classes by base opcode (the text before the first dot). U-prefixed opcodes run on the
# uniform datapath; they still take an issue slot, and are counted as their own class.
CLASSES = {
    "tensor": {"HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA", "UTCHMMA"},
    "global_load": {"LDG"},
    "async_copy": {"LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF", "UTMASTG"},
    "shared": {"LDS", "STS", "LDSM", "STSM"},
    "global_store": {"STG"},
    "atomic": {"ATOM", "ATOMG", "RED", "ATOMS", "REDG"},
    "convert": {"F2F", "F2I", "I2F", "F2FP", "I2FP", "FRND", "PRMT"},
    "float": {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2",
              "MUFU", "FCHK", "DADD", "DFMA", "DMUL", "FSWZADD"},
    "integer": {"IADD3", "IMAD", "LEA", "SHF", "LOP3", "ISETP", "IMNMX", "SEL", "IABS", "POPC", "FLO", "BREV", "SGXT",
                "BMSK", "IADD", "MOV", "VIADD", "VIMNMX", "PLOP3", "P2R", "R2P", "S2R", "CS2R", "LDC", "ULDC", "IDP",
                "SHL", "SHR", "LOP", "IMUL", "ISCADD", "IMNMX3", "VIADDMNMX", "I2IP", "R2UR", "S2UR"},
    "barrier": {"BAR", "SYNCS", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "ARRIVES",
                "WARPSYNC", "BSSY", "BSYNC", "NANOSLEEP"},
    "shuffle": {"SHFL", "VOTE", "VOTEU", "MATCH", "REDUX"},
    "control": {"BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "YIELD", "ACQBULK", "ELECT"},
}
_CLASS_OF = {opcode: name for name, opcodes in CLASSES.items() for opcode in opcodes}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_WGMMA_WAIT = re.compile(r"gsb0,\s*0x([0-9a-f]+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # the base opcode, e.g. "LDG"
    modifiers: tuple  # e.g. ("E", "U8")
    operands: str

    @property
    def kind(self) -> str:
        if self.opcode.startswith("U") and self.opcode not in _CLASS_OF:
            return "uniform"
        return _CLASS_OF.get(self.opcode, "other")

    @property
    def width(self) -> int:
        """Bytes per thread of a load or copy (4 unless a width modifier says otherwise)."""
        return next((_WIDTH[m] for m in self.modifiers if m in _WIDTH), 4)


@dataclass
class LoopCounts:
    """One iteration of a main loop, per warp."""

    instructions: int  # executed: an inner loop's body counted once per trip
    static_instructions: int  # in the loop's address range
    by_class: dict
    global_loads_by_width: dict  # bytes per thread -> count, LDG only
    async_copies_by_width: dict  # bytes per thread -> count, LDGSTS (cp.async); TMA is one instruction per tile
    tensor_ops: dict = field(default_factory=dict)  # full opcode (shape and types) -> count
    wgmma_wait_depth: Optional[int] = None  # the smallest `WARPGROUP.DEPBAR.LE gsb0, N` in the loop

    @property
    def scalar_global_loads(self) -> int:
        """Global loads of 4 bytes or less per thread (LDG and LDGSTS): gathers, not tiles."""
        narrow = lambda by_width: sum(count for width, count in by_width.items() if width <= 4)  # noqa: E731
        return narrow(self.global_loads_by_width) + narrow(self.async_copies_by_width)

    def per_element(self, count: int, warps: int, elements: int) -> float:
        """Thread instructions per weight element: `count` per warp · warps · 32 / elements."""
        return count * warps * 32 / elements


def parse(sass: str) -> list[Instruction]:
    """The instructions of one kernel's `cuobjdump -sass` text, in address order (NOPs left out)."""
    found = []
    for line in sass.splitlines():
        match = _LINE.search(line)
        if match and match.group(2) != "NOP":
            modifiers = tuple(filter(None, match.group(3).split(".")))
            found.append(Instruction(int(match.group(1), 16), match.group(2), modifiers, match.group(4).strip()))
    return found


def main_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the kernel's main loop (see the module docstring); empty if it has no loop."""
    loops = []
    for branch in instructions:
        if branch.opcode != "BRA":
            continue
        target = _BRANCH_TARGET.search(branch.operands)
        if target and int(target.group(1), 16) < branch.address:
            start = int(target.group(1), 16)
            loops.append([i for i in instructions if start <= i.address <= branch.address])
    tensor = lambda body: sum(i.kind == "tensor" for i in body)  # noqa: E731
    wide = lambda body: sum(i.opcode == "LDG" and i.width == 16 for i in body)  # noqa: E731
    if any(map(tensor, loops)):
        return max(loops, key=lambda body: (tensor(body), -len(body)))
    if any(map(wide, loops)):
        return max(loops, key=lambda body: (wide(body), len(body)))
    return []


def count(body: list[Instruction], inner_trips: int = 1) -> LoopCounts:
    """Per-iteration counts of a loop body whose inner loops run `inner_trips` times each."""
    inner = set()
    for branch in body[:-1]:  # the last instruction closes the loop itself
        target = _BRANCH_TARGET.search(branch.operands) if branch.opcode == "BRA" else None
        if target and int(target.group(1), 16) < branch.address:
            inner.update(i.address for i in body if int(target.group(1), 16) <= i.address <= branch.address)
    executed = [(i, inner_trips if i.address in inner else 1) for i in body]

    def tally(key, where=lambda i: True) -> dict:
        counts = Counter()
        for i, times in executed:
            if where(i):
                counts[key(i)] += times
        return dict(counts)

    tensor_ops = tally(lambda i: ".".join((i.opcode, *i.modifiers)), lambda i: i.kind == "tensor")
    waits = [int(m.group(1), 16) for i in body if i.opcode == "WARPGROUP" and (m := _WGMMA_WAIT.search(i.operands))]
    return LoopCounts(sum(times for _, times in executed), len(body), tally(lambda i: i.kind),
                      tally(lambda i: i.width, lambda i: i.opcode == "LDG"),
                      tally(lambda i: i.width, lambda i: i.opcode == "LDGSTS"), tensor_ops,
                      min(waits) if waits else None)


@functools.lru_cache(maxsize=None)
def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the copy Triton ships."""
    bundled = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for candidate in ("/usr/local/cuda/bin/cuobjdump", str(bundled), shutil.which("cuobjdump") or ""):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("no cuobjdump: install the CUDA toolkit (or a Triton that bundles it)")


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource-usage text) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        sass = subprocess.run([cuobjdump(), "-sass", handle.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump(), "-res-usage", handle.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def resource_usage(usage: str) -> dict:
    """{"registers", "local_bytes" (spill and stack), "static_shared"} from `cuobjdump -res-usage`."""
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "local_bytes": local + stack, "static_shared": shared}
