"""Hardware: accelerator names, their chips, and mesh rules that pick a layout per accelerator.

`config.hardware` names what a run is meant for, as the Cloud accelerator
types are written (axlearn's `mesh_selector` style):

  tpu-v4-512, tpu-v5p-256, tpu-v5litepod-256, tpu-v6e-256   one slice (v4/v5p count TensorCores,
                                                             v5e/v6e chips, as Cloud does)
  tpu-v5p-256-2                                             two slices (multislice over DCN)
  gpu-h100-32                                               32 H100s (nodes of 8)

`config.mesh_rules` is a tuple of (regex, overrides): the first regex that
matches `config.hardware` sets those config fields (mesh shape, remat,
gradient accumulation, compute dtype), axlearn's `mesh_rules` idea. The rules
are config data, so the golden configs show them. `apply_mesh_rules` gives
the config with its rule applied (a copy), which is then validated;
`check_devices` refuses a run whose devices are not the hardware it names.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Collection, Sequence
from typing import Any

import ml_collections

from veclip_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation: what each chip holds, computes and moves (per chip, spec sheets)."""

    name: str  # as JAX's device_kind says it
    hbm_gib: float  # per chip
    peak_bf16_tflops: float  # dense, per chip
    cores_in_name: int  # Cloud's accelerator type counts this many units per chip (v4, v5p: 2 cores)
    dims: int  # physical torus dimensions (3 for v4/v5p, 2 for v5e/v6e)
    hbm_gbps: float  # HBM bandwidth, GB/s (1e9 bytes)
    ici_gbps: float  # interconnect bandwidth into one chip, one direction, GB/s (all links together)


# Spec sheets (Cloud TPU "System architecture" pages for v4, v5p, v5e, v6e; NVIDIA's H100 SXM sheet):
# peak dense bf16, HBM bandwidth, and the bidirectional ICI / NVLink bandwidth per chip, halved here
# for one direction (a chip receives at most this much): v5p 1,200 GB/s bidirectional (older page:
# 4,800 Gbps = 600 GB/s), v5e 400, v6e 800, H100 NVLink 900. v4's page gives no per-chip ICI figure:
# 600 GB/s bidirectional is an *estimate* (6 links at half v5p's per-link rate), not a spec-sheet
# number. The H100 figure is NVLink inside a node of 8; across nodes InfiniBand is far slower.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32.0, 275.0, 2, 3, hbm_gbps=1200.0, ici_gbps=300.0),
    "v5p": Chip("TPU v5", 95.0, 459.0, 2, 3, hbm_gbps=2765.0, ici_gbps=600.0),
    "v5litepod": Chip("TPU v5 lite", 16.0, 197.0, 1, 2, hbm_gbps=819.0, ici_gbps=200.0),
    "v6e": Chip("TPU v6 lite", 32.0, 918.0, 1, 2, hbm_gbps=1640.0, ici_gbps=400.0),
    "h100": Chip("NVIDIA H100 80GB HBM3", 80.0, 989.0, 1, 0, hbm_gbps=3350.0, ici_gbps=450.0),
}
# JAX's compile-only topology names (libtpu): generation:shape.
_TOPOLOGY_GENERATION = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}

_NAME = re.compile(r"^(tpu|gpu)-([a-z0-9]+)-(\d+)(?:-(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A parsed `config.hardware` name."""

    name: str
    platform: str  # "tpu" or "gpu"
    generation: str  # a key of CHIPS
    chips: int  # per slice
    slices: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def total_chips(self) -> int:
        return self.chips * self.slices

    def topology(self) -> str:
        """The compile-only TPU topology of one slice, e.g. "v5p:4x4x8" for tpu-v5p-256."""
        if self.platform != "tpu":
            raise UserError(f"config.hardware={self.name}: only TPU topologies can be compiled for here")
        shape = "x".join(map(str, torus_shape(self.chips, self.chip.dims)))
        return f"{_TOPOLOGY_GENERATION[self.generation]}:{shape}"


# Cloud's slice shapes (chips per torus dimension) by chip count.
_SHAPES_3D = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
    256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}  # fmt: skip
_SHAPES_2D = {
    1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16),
}  # fmt: skip


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud uses for `chips` chips on a `dims`-D torus."""
    shapes = _SHAPES_3D if dims == 3 else _SHAPES_2D
    if chips not in shapes:
        raise UserError(f"no {dims}-D TPU slice of {chips} chips (slices: {sorted(shapes)})")
    return shapes[chips]


def parse_hardware(name: str) -> Accelerator:
    """`tpu-v5p-256[-slices]` or `gpu-h100-32` -> Accelerator; UserError naming the field otherwise."""
    m = _NAME.match(name)
    if not m or m.group(2) not in CHIPS:
        known = ", ".join(f"{'gpu' if g == 'h100' else 'tpu'}-{g}-N" for g in CHIPS)
        raise UserError(f"config.hardware={name!r}: not an accelerator name ({known}, optionally -SLICES)")
    platform, generation, count, slices = m.group(1), m.group(2), int(m.group(3)), int(m.group(4) or 1)
    if (platform == "gpu") != (generation == "h100"):
        raise UserError(f"config.hardware={name!r}: {generation} is not a {platform}")
    per_chip = CHIPS[generation].cores_in_name
    if count % per_chip:
        raise UserError(f"config.hardware={name!r}: {generation} counts {per_chip} cores per chip")
    return Accelerator(name, platform, generation, count // per_chip, slices)


def matching_rule(rules: Sequence[Any], hardware: str) -> tuple[str, dict[str, Any]] | None:
    """The first (regex, overrides) of `rules` whose regex matches `hardware` in full, or None."""
    for pattern, overrides in rules:
        if re.fullmatch(pattern, hardware):
            return pattern, dict(overrides)
    return None


def apply_mesh_rules(
    config: ml_collections.ConfigDict, keep: Collection[str] = ()
) -> tuple[ml_collections.ConfigDict, str | None]:
    """A copy of `config` with the fields the matching rule of `config.mesh_rules` sets, and its regex.

    The given config is not changed (a config is checked as it will run:
    veclip_jax/config.py `check_config` applies the rule, then validates).
    Overrides are dotted field paths ("mesh.fsdp", "model.remat"). `keep`
    names fields the user set explicitly (the `--config.X` flags of
    train.py / compile.py: `user_fields`): a rule never overwrites one, nor a
    field inside one, so `--config.model.remat=dots` compiles and trains with
    dots whatever the hardware's rule says (`kept_over_rule` lists those for a
    note). The hardware's slice count becomes `config.mesh.slices`. Without
    `config.hardware` the copy is unchanged and the regex None; likewise the
    regex when no rule matches. An unknown field in a rule is a UserError naming it.
    """
    config = copy.deepcopy(config)
    if not config.hardware:
        return config, None
    accelerator = parse_hardware(config.hardware)
    config.mesh.slices = accelerator.slices
    found = matching_rule(config.mesh_rules, config.hardware)
    if found is None:
        return config, None
    pattern, overrides = found
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        node = config
        for part in path:
            if part not in node:
                raise UserError(f"config.mesh_rules[{pattern!r}]: config.{dotted} is not a field")
            node = node[part]
        if leaf not in node:
            raise UserError(f"config.mesh_rules[{pattern!r}]: config.{dotted} is not a field")
        if not _is_kept(dotted, keep):
            node[leaf] = value
    return config, pattern


def _is_kept(dotted: str, keep: Collection[str]) -> bool:
    """Whether the field `dotted` is one of `keep`, or inside one (keep "model" covers "model.remat")."""
    return any(dotted == k or dotted.startswith(k + ".") for k in keep)


def user_fields(overrides: Collection[str] | dict[str, Any]) -> tuple[str, ...]:
    """The dotted config fields set on the command line, from ml_collections'
    `config_flags.get_override_values(FLAGS["config"])` (a flat {"model.remat": "dots"} dict) or
    from the arguments themselves ("--config.model.remat=dots"); other arguments are ignored."""
    fields = []
    for item in overrides:
        name = item[len("--config.") :].split("=", 1)[0] if item.startswith("--config.") else item
        if name and not name.startswith("-"):
            fields.append(name)
    return tuple(dict.fromkeys(fields))


def kept_over_rule(config: ml_collections.ConfigDict, keep: Collection[str]) -> list[str]:
    """'config.FIELD=given (the rule for HARDWARE says RULE)' for each field of `keep` that the
    matching rule would have set to another value: what the CLIs print so the choice is visible."""
    found = matching_rule(config.mesh_rules, config.hardware) if config.hardware else None
    notes = []
    for dotted, value in (found[1] if found else {}).items():
        if not _is_kept(dotted, keep):
            continue
        node: Any = config
        for part in dotted.split("."):
            node = node[part] if part in node else None
            if node is None:
                break
        if node != value:
            notes.append(f"config.{dotted}={node} (given; the {config.hardware} rule says {value})")
    return notes


def check_devices(hardware: str, devices: Sequence[Any]) -> None:
    """Refuses devices that are not the accelerator `config.hardware` names (kind and count)."""
    if not hardware:
        return
    accelerator = parse_hardware(hardware)
    kinds = {d.device_kind for d in devices}
    want = accelerator.chip.name
    if kinds != {want} and not all(k.startswith(want) for k in kinds):
        raise UserError(f"config.hardware={hardware} expects {want} devices, the run has {sorted(kinds)}: "
                        "set config.hardware to this machine's accelerator, or to \"\"")  # fmt: skip
    chips = len(devices) // max(1, devices_per_chip(devices))
    if chips != accelerator.total_chips:
        raise UserError(f"config.hardware={hardware} is {accelerator.total_chips} chips, the run has {chips} "
                        f"({len(devices)} devices)")  # fmt: skip


def devices_per_chip(devices: Sequence[Any]) -> int:
    """JAX devices per physical chip (2 for v4's separate TensorCores, else 1)."""
    coords = {tuple(getattr(d, "coords", ()) or ()) for d in devices}
    return max(1, len(devices) // len(coords)) if coords != {()} else 1
