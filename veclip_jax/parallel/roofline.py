"""The roofline of a compiled step: the least time its FLOPs, its memory traffic and its collectives
need on a chip, from XLA's own cost analysis of the program as compiled.

  compute    = FLOPs per device / the device's peak bf16 FLOP/s
  memory     = bytes accessed per device / HBM bandwidth
  collective = bytes the collectives move per device / the interconnect bandwidth into a chip

The largest is the step's lower bound (the others may overlap with it, at best); the MFU ceiling it
implies is model FLOPs / (bound x peak): what no schedule can beat on that chip.

Loops. XLA's cost analysis counts a while loop's body once, and the towers scan their layers (a
while loop of `layers` trips; gradient accumulation is another loop around them). The compiled
HLO text says how often each loop runs (its condition compares the counter with a constant), so
each loop body is analysed on its own (`jaxlib`'s HloCostAnalysis of the body as a module: the TPU
compiler's FLOP count exactly, checked in tests/test_roofline.py) and added trip-1 more times.
Bytes accessed: the TPU compiler counts more than the generic analysis does (its layouts,
memory-space copies); its figure is scaled by the same loop factor the generic analysis finds.

Collective bytes: per device, the larger of an op's operands and its result (an all-gather
receives its result, a reduce-scatter sends its operand, an all-reduce / all-to-all / permute
moves at least its operand), times the trips of the loops around it: a lower bound, since a ring
all-reduce moves about twice its operand.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from veclip_jax.parallel.hardware import Chip

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape ("f32[8,128]{1,0}", a tuple of them, "f8e4m3fn[4]"); layouts ignored."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype.startswith("f8"):
            size = 1
        elif dtype in _BYTES:
            size = _BYTES[dtype]
        else:
            continue  # token[], opaque
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # result shape text
    opcode: str
    operands: list[str]  # operand instruction names
    attrs: str  # the rest of the line
    args: str = ""  # the text inside the parentheses (a constant's literal)


@dataclasses.dataclass
class Module:
    """An HLO module's text, split: computations in text order (callees before callers, ENTRY last)."""

    computations: dict[str, list[Instruction]]
    lines: dict[str, tuple[int, int]]  # computation -> its [first, last] line numbers in the text
    entry: str
    text_lines: list[str]

    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for body in self.computations.values() for i in body}


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses in HLO: {text[start:start + 80]!r}")


def _instruction(line: str) -> Instruction | None:
    body = line.strip()
    if body.startswith("ROOT "):
        body = body[5:]
    name, eq, rest = body.partition(" = ")
    if not eq or not name.startswith("%"):
        return None
    if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
        end = _closing(rest, 0) + 1
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    close = _closing(rest, paren)
    args = rest[paren + 1 : close]
    return Instruction(name[1:], shape, opcode, _NAME.findall(args), rest[close + 1 :], args)


def parse_module(text: str) -> Module:
    """Splits HLO text (`compiled.as_text()`) into computations and instructions."""
    computations: dict[str, list[Instruction]] = {}
    spans: dict[str, tuple[int, int]] = {}
    lines = text.splitlines()
    current, entry, first = None, "", 0
    for n, line in enumerate(lines):
        if current is None:
            if line.endswith("{") and not line.startswith((" ", "HloModule")):
                head = line[6:] if line.startswith("ENTRY ") else line
                current = head.split(" ", 1)[0].lstrip("%")
                entry = current if line.startswith("ENTRY ") else entry
                computations[current], first = [], n
            continue
        if line.startswith("}"):
            spans[current] = (first, n)
            current = None
            continue
        instruction = _instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, spans, entry, lines)


def _callees(instruction: Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls."""
    found = _CALLS.findall(instruction.attrs)
    for group in _BRANCHES.findall(instruction.attrs):
        found += [("branch", c) for c in _NAME.findall(group)]
    return found


def multiplicities(module: Module) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(times each computation runs per step, trips of each while body, loops whose trip count is
    unknown: counted once). Callers come after their callees in HLO text, so one backward pass."""
    mult = dict.fromkeys(module.computations, 0)
    mult[module.entry] = 1
    trips: dict[str, int] = {}
    unknown: list[str] = []
    for name in reversed(list(module.computations)):
        for i in module.computations[name]:
            calls = _callees(i)
            if not calls:
                continue
            n = 1
            if i.opcode == "while":
                n = trip_count(module, i, name)
                if n is None:
                    unknown.append(i.name)
                    n = 1
            for role, callee in calls:
                if callee not in mult:
                    continue
                if role == "body":
                    trips[callee] = n
                mult[callee] += mult[name] * (n if role in ("body", "condition") else 1)
    return mult, trips, unknown


def _through(body: dict[str, Instruction], name: str) -> Instruction | None:
    """The instruction `name`, looking through copies and converts."""
    i = body.get(name)
    while i is not None and i.opcode in ("copy", "convert", "bitcast") and i.operands:
        i = body.get(i.operands[0])
    return i


def _int_constant(i: Instruction | None) -> int | None:
    if i is None or i.opcode != "constant" or not re.fullmatch(r"\s*-?\d+\s*", i.args):
        return None
    return int(i.args)


def _tuple_index(i: Instruction | None) -> int | None:
    if i is None or i.opcode != "get-tuple-element":
        return None
    m = re.search(r"\bindex=(\d+)", i.attrs)
    return int(m.group(1)) if m else None


def trip_count(module: Module, loop: Instruction, caller: str) -> int | None:
    """Trips of a while loop (`loop`, an instruction of computation `caller`): its
    known_trip_count, or read from its condition `counter < limit`, the body's `counter + step`
    and the counter's initial value (JAX's scans and XLA's windowed einsums count so). None when
    the condition is not of that form."""
    known = _TRIP.search(loop.attrs)
    if known:
        return int(known.group(1))
    roles = dict(_callees(loop))
    condition = {i.name: i for i in module.computations.get(roles.get("condition", ""), [])}
    body = {i.name: i for i in module.computations.get(roles.get("body", ""), [])}
    roots = [i for i in condition.values() if i.opcode == "compare"]
    if not condition or not roots or len(roots[-1].operands) != 2:
        return None
    root = roots[-1]
    direction = re.search(r"direction=(\w+)", root.attrs)
    direction = direction.group(1) if direction else ""
    lhs, rhs = (_through(condition, o) for o in root.operands)
    if _int_constant(rhs) is not None and direction in ("LT", "LE"):
        limit, index = _int_constant(rhs) + (direction == "LE"), _tuple_index(lhs)
    elif _int_constant(lhs) is not None and direction in ("GT", "GE"):
        limit, index = _int_constant(lhs) + (direction == "GE"), _tuple_index(rhs)
    else:
        return None
    if index is None:
        return None
    step = 1
    returned = [i for i in body.values() if i.opcode == "tuple"]
    if returned and index < len(returned[-1].operands):
        update = _through(body, returned[-1].operands[index])
        if update is not None and update.opcode == "add":
            steps = [_int_constant(_through(body, o)) for o in update.operands]
            step = next((v for v in steps if v), 1)
    start = 0
    callers = {i.name: i for i in module.computations.get(caller, [])}
    init = _through(callers, loop.operands[0]) if loop.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        start = _int_constant(_through(callers, init.operands[index])) or 0
    return max(0, -(-(limit - start) // step))


def collective_bytes(text: str) -> dict[str, int]:
    """Bytes each collective kind moves per device in one run of the module (see the module
    docstring), loops' trips applied; {} when there are none."""
    module = parse_module(text)
    mult, _, _ = multiplicities(module)
    shapes = module.shapes()
    out: dict[str, int] = {}
    for name, body in module.computations.items():
        if not mult[name]:
            continue
        for i in body:
            kind = i.opcode.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            operands = sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
            result = shape_bytes(i.shape)
            if i.opcode.endswith("-start") and i.shape.startswith("("):
                result = max(result - operands, 0)  # (operands, results, context): the results
            out[kind] = out.get(kind, 0) + mult[name] * max(operands, result)
    return out


def _submodule(module: Module, root: str) -> str:
    """HLO text of `root` and everything it calls, `root` as the entry: its cost analysed alone."""
    keep, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in keep or name not in module.computations:
            continue
        keep.add(name)
        todo += [c for i in module.computations[name] for _, c in _callees(i)]
    parts = [f"HloModule {root}_alone", ""]
    for name in module.computations:  # text order: callees first
        if name in keep:
            first, last = module.lines[name]
            block = module.text_lines[first : last + 1]
            head = block[0].removeprefix("ENTRY ")
            parts += [("ENTRY " + head) if name == root else head, *block[1:], ""]
    return "\n".join(parts)


def generic_cost(text: str) -> dict[str, float]:
    """XLA's HloCostAnalysis (the generic one, run by jaxlib on the host) of an HLO module's text."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo

    client = jax.devices("cpu")[0].client
    cost = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
    return {k: float(v) for k, v in cost.items() if k in ("flops", "bytes accessed")}


def loop_factors(text: str, cost: Callable[[str], dict[str, float]] = generic_cost) -> dict[str, Any]:
    """How much more than XLA's once-per-loop count a step does: {"flops": f, "bytes accessed": b}
    factors (>= 1), the loops' trips, and loops whose trips could not be read (counted once)."""
    module = parse_module(text)
    mult, trips, unknown = multiplicities(module)
    once = cost(text)
    bodies = [b for b in trips if mult.get(b)]
    subtree = {b: cost(_submodule(module, b)) for b in bodies}
    # a body's cost without the loops nested in it (each counted in its own right)
    reach: dict[str, set[str]] = {}

    def reachable(name: str) -> set[str]:
        if name not in reach:
            reach[name] = set()
            for i in module.computations.get(name, []):
                for _, c in _callees(i):
                    reach[name] |= {c} | reachable(c)
        return reach[name]

    factors = {}
    for key in ("flops", "bytes accessed"):
        total = once.get(key, 0.0)
        for b in bodies:
            nested = [c for c in bodies if c != b and c in reachable(b)]
            direct = [c for c in nested if not any(c in reachable(d) for d in nested if d != c)]
            exclusive = subtree[b].get(key, 0.0) - sum(subtree[c].get(key, 0.0) for c in direct)
            total += (mult[b] - 1) * max(exclusive, 0.0)
        factors[key] = total / once[key] if once.get(key) else 1.0
    return {"factors": factors, "trips": {b: trips[b] for b in bodies}, "unknown_trips": unknown}


class Bounds:
    """The three lower bounds' verdict, for a class with compute_s, memory_s, collective_s (seconds)
    and ideal_s (the model's FLOPs at the peak: the step time at 100 % MFU)."""

    compute_s: float
    memory_s: float
    collective_s: float

    @property
    def ideal_s(self) -> float:
        raise NotImplementedError

    @property
    def bound_s(self) -> float:
        """The step's lower bound: the largest of the three."""
        return max(self.compute_s, self.memory_s, self.collective_s)

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "memory": self.memory_s, "collective": self.collective_s}
        return max(times, key=times.get)

    @property
    def mfu_ceiling(self) -> float:
        """Model FLOPs / (bound x peak): the MFU no schedule of this program can beat."""
        return self.ideal_s / self.bound_s if self.bound_s else 0.0


@dataclasses.dataclass(frozen=True)
class Roofline(Bounds):
    """Lower bounds on one step's time on one device, from the compiled program."""

    flops: float  # per device, loops' trips applied
    bytes_accessed: float  # per device, HBM traffic
    collective_bytes: float  # per device
    compute_s: float
    memory_s: float
    collective_s: float
    model_flops: float  # per device: the model's (no remat), for the MFU ceiling
    peak_flops: float  # per device

    @property
    def ideal_s(self) -> float:
        return self.model_flops / self.peak_flops


def roofline(
    flops: float,
    bytes_accessed: float,
    collective: float,
    chip: Chip,
    model_flops: float,
    devices_per_chip: int = 1,
) -> Roofline:
    """The three bounds for a device's FLOPs, bytes and collective bytes on `chip` (a chip's rates
    shared by its `devices_per_chip` devices); `model_flops` per device for the MFU ceiling."""
    peak = chip.peak_bf16_tflops * 1e12 / devices_per_chip
    hbm = chip.hbm_gbps * 1e9 / devices_per_chip
    ici = chip.ici_gbps * 1e9 / devices_per_chip
    return Roofline(
        flops=flops,
        bytes_accessed=bytes_accessed,
        collective_bytes=collective,
        compute_s=flops / peak,
        memory_s=bytes_accessed / hbm,
        collective_s=collective / ici,
        model_flops=model_flops,
        peak_flops=peak,
    )


def step_roofline(
    compiled: Any, chip: Chip, model_flops: float, devices_per_chip: int = 1
) -> tuple[Roofline, dict[str, Any]]:
    """The roofline of a compiled step (`jax.stages.Compiled`), and the details behind it: XLA's
    once-per-loop figures, the loop factors, the loops' trips, the collective bytes per kind."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    loops = loop_factors(text)
    flops = float(cost.get("flops", 0.0)) * loops["factors"]["flops"]
    traffic = float(cost.get("bytes accessed", 0.0)) * loops["factors"]["bytes accessed"]
    collectives = collective_bytes(text)
    detail = {"xla_flops_once": float(cost.get("flops", 0.0)),
              "xla_bytes_once": float(cost.get("bytes accessed", 0.0)), **loops,
              "collectives": collectives}  # fmt: skip
    moved = float(sum(collectives.values()))
    return roofline(flops, traffic, moved, chip, model_flops, devices_per_chip), detail
