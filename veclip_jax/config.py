"""Config checking: every field known, of the right type, in range, before any compute.

`veclip_jax/defaults.py` is the schema: an experiment config must have exactly its
fields (an unknown one is usually a typo, and would otherwise be silently
ignored), of its types, with values in the ranges below. `validate_config`
raises `ConfigError` naming the first offending field, e.g.

    config.data.vecap_prob=1.5: a probability must lie in [0, 1]

The mesh and the batch are checked against the devices and processes the run
will use, so a mesh that does not fit fails here rather than after the data
and model are built.

Every field check goes through the one typed checker, veclip_jax/schema.py
(the evaluation entries and the objectives' sub-sections too). A run's config
is checked once: `check_config` applies the hardware's mesh rule (a new
config) and validates it, returning a `CheckedConfig`; the CLI does this
before JAX starts, and `train()` given a CheckedConfig runs only what needs the
devices (`validate_layout`, the devices' kind).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

import ml_collections

from veclip_jax import defaults, schema
from veclip_jax.errors import ConfigError, UserError  # ConfigError re-exported: its home is errors.py
from veclip_jax.eval import registry
from veclip_jax.objectives import OBJECTIVES, Objective, make_objective
from veclip_jax.parallel.axes import BATCH_AXES, MESH_AXES
from veclip_jax.parallel.hardware import apply_mesh_rules, parse_hardware

# Fields whose keys are data, not schema: the evaluation registry's entry names (each entry
# is checked by veclip_jax/eval/registry.py instead).
FREE_FORM = {"evals", "data.sources"}  # data.sources: names -> defaults.SOURCE_FIELDS, checked below


def _base_config() -> ml_collections.ConfigDict:
    return defaults.get_config()


Check = schema.Check


def _positive(x: Any) -> bool:
    return x >= 1


def _prob(x: Any) -> bool:
    return 0.0 <= x <= 1.0


def _range_pair(lo_min: float, hi_max: float) -> Any:
    return lambda v: len(v) == 2 and lo_min < v[0] <= v[1] <= hi_max


_RANGES: list[Check] = [
    ("seed", lambda x: x >= 0, "must be >= 0"),
    ("batch_size", _positive, "must be >= 1"),
    ("total_steps", _positive, "must be >= 1"),
    ("log_every", _positive, "must be >= 1"),
    ("eval_every", lambda x: x >= 0, "must be >= 0 (0 = never)"),
    ("checkpoint_every", lambda x: x >= 0, "must be >= 0 (0 = only at the end and on SIGTERM)"),
    ("keep_checkpoints", _positive, "must be >= 1"),
    ("max_nonfinite_steps", _positive, "must be >= 1"),
    ("model.vision.image_size", _positive, "must be >= 1"),
    ("model.vision.patch_size", _positive, "must be >= 1"),
    ("model.vision.width", _positive, "must be >= 1"),
    ("model.vision.type", lambda x: x in ("vit", "resnet"), "must be 'vit' or 'resnet'"),
    ("model.vision.heads", _positive, "must be >= 1"),
    ("model.text.vocab_size", lambda x: x >= 2, "must be >= 2"),
    ("model.text.context_length", lambda x: x >= 2, "must be >= 2 (text and end-of-text)"),
    ("model.text.width", _positive, "must be >= 1"),
    ("model.text.layers", _positive, "must be >= 1"),
    ("model.text.heads", _positive, "must be >= 1"),
    ("model.text.mlp_dim", _positive, "must be >= 1"),
    ("model.text.pad_id", lambda x: x >= 0, "must be >= 0"),
    ("model.text.eos_id", lambda x: x >= 0, "must be >= 0"),
    ("model.text.mask_id", lambda x: x >= -1, "must be an id >= 0, or -1 (the id past the tokenizer's)"),
    ("model.embed_dim", _positive, "must be >= 1"),
    ("model.act", lambda x: x in ("quick_gelu", "gelu"), "must be 'quick_gelu' or 'gelu'"),
    ("model.layer_norm_eps", lambda x: x > 0, "must be > 0"),
    ("model.dtype", lambda x: x in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'"),
    ("model.remat", lambda x: x in ("none", "full", "dots", "dots_no_batch"), "must be a remat policy"),
    ("model.attention", lambda x: x in ("auto", "xla", "cudnn"), "must be 'auto', 'xla' or 'cudnn'"),
    ("model.logit_scale_init", math.isfinite, "must be finite"),
    ("model.logit_scale_max", lambda x: x > 0, "must be > 0"),
    ("mesh.data", lambda x: x >= 1 or x == -1, "must be a positive size or -1"),
    ("mesh.fsdp", lambda x: x >= 1 or x == -1, "must be a positive size or -1"),
    ("mesh.tensor", lambda x: x >= 1 or x == -1, "must be a positive size or -1"),
    ("optim.learning_rate", lambda x: x > 0 and math.isfinite(x), "must be > 0"),
    ("optim.warmup_steps", lambda x: x >= 0, "must be >= 0"),
    ("optim.warmup_init_lr", lambda x: x >= 0 and math.isfinite(x), "must be >= 0"),
    ("optim.end_lr_ratio", _prob, "must lie in [0, 1]"),
    ("optim.b1", lambda x: 0 <= x < 1, "must lie in [0, 1)"),
    ("optim.b2", lambda x: 0 <= x < 1, "must lie in [0, 1)"),
    ("optim.eps", lambda x: x > 0, "must be > 0"),
    ("optim.weight_decay", lambda x: x >= 0, "must be >= 0"),
    ("optim.grad_clip_norm", lambda x: x >= 0, "must be >= 0 (0 = off)"),
    ("optim.grad_accum_steps", _positive, "must be >= 1"),
    ("data.vecap_prob", _prob, "a probability must lie in [0, 1]"),
    ("data.max_bad_fraction", _prob, "a fraction must lie in [0, 1]"),
    ("data.bad_window", _positive, "must be >= 1"),
    ("data.crop_scale", _range_pair(0.0, 1.0), "must be (low, high) with 0 < low <= high <= 1"),
    ("data.crop_ratio", _range_pair(0.0, math.inf), "must be (low, high) with 0 < low <= high"),
    ("data.decoder", lambda x: x in ("simplejpeg", "pil"), "must be 'simplejpeg' or 'pil'"),
    ("data.resize_backend", lambda x: x in ("torch", "pil"), "must be 'torch' or 'pil'"),
    ("data.num_workers", lambda x: x >= 0, "must be >= 0"),
    ("data.num_threads", _positive, "must be >= 1"),
    ("data.prefetch", _positive, "must be >= 1"),
    ("data.augment.views", lambda x: x in (1, 2), "must be 1 or 2"),
    ("data.augment.view_crop_scale", _range_pair(0.0, 1.0), "must be (low, high) with 0 < low <= high <= 1"),
    (
        "data.augment.color_jitter",
        lambda v: len(v) == 4 and min(v) >= 0 and v[3] <= 0.5,
        "must be (brightness, contrast, saturation, hue), each >= 0, hue <= 0.5",
    ),
    ("data.augment.color_jitter_prob", _prob, "a probability must lie in [0, 1]"),
    ("data.augment.grayscale_prob", _prob, "a probability must lie in [0, 1]"),
    ("data.augment.blur_prob", _prob, "a probability must lie in [0, 1]"),
    ("data.augment.blur_sigma", _range_pair(0.0, math.inf), "must be (low, high) with 0 < low <= high"),
    ("data.augment.flip_prob", _prob, "a probability must lie in [0, 1]"),
    ("data.augment.eda_alpha", _prob, "a fraction of words must lie in [0, 1]"),
    ("data.augment.mlm_prob", _prob, "a probability must lie in [0, 1]"),
    ("eval_batch_size", _positive, "must be >= 1"),
    ("objective.name", lambda x: x in OBJECTIVES, f"must be one of {', '.join(map(repr, OBJECTIVES))}"),
]


def _check_ranges(config: Any) -> Objective:
    schema.check_ranges(config, _RANGES, "config")
    m = config.model
    _check_vision(m.vision)
    if m.text.width % m.text.heads:
        raise ConfigError(f"config.model.text.width={m.text.width} is not divisible by heads={m.text.heads}")
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError(
            f"config.model.vision.image_size={m.vision.image_size} is not a multiple of "
            f"patch_size={m.vision.patch_size}"
        )
    for name in ("pad_id", "eos_id", "mask_id"):
        if m.text[name] >= m.text.vocab_size:
            raise ConfigError(
                f"config.model.text.{name}={m.text[name]} is outside vocab_size={m.text.vocab_size}"
            )
    if m.text.mask_id in (m.text.pad_id, m.text.eos_id):
        raise ConfigError(
            f"config.model.text.mask_id={m.text.mask_id} is the padding or end-of-text id: give masking its "
            "own id, or -1 (the first id past the tokenizer's)"
        )
    _check_sources(config.data)
    if config.data.tokenizer == "clip_bpe":
        _check_clip_bpe(m.text)
    if (config.data.train_files or config.data.sources) and not config.data.tokenizer:
        raise ConfigError(
            "config.data.tokenizer is empty but config.data.train_files (or sources) is set: real data "
            "needs its tokenizer (a sentencepiece model, e.g. T5's spiece.model, or a HF tokenizer "
            "directory); "
            "the demo tokenizer knows only the demo captions. Train one with "
            "`python launch/make_tokenizer.py --input=SHARDS --out=spiece.model`"
        )
    try:
        objective = make_objective(config.objective)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if objective.views and config.data.augment.views != objective.views:
        raise ConfigError(
            f"config.data.augment.views={config.data.augment.views}: objective {objective.name!r} reads "
            f"{objective.views} augmented view(s) of each image; set it to {objective.views}"
        )
    if config.optim.grad_accum_steps > 1 and m.vision.type == "resnet":
        raise ConfigError(
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}: the ResNet tower "
            "(config.model.vision.type) normalises with batch statistics, which micro-batches would "
            "change (each would see only its own examples): use 1 (and a smaller batch or more devices)"
        )
    if config.optim.grad_accum_steps > 1 and not objective.pooled_only:
        raise ConfigError(
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}: objective "
            f"{objective.name!r} (config.objective.name) needs more than the pooled embeddings, so the "
            "exact gradient accumulation cannot serve it; use 1 (and a smaller batch or more devices)"
        )
    if config.optim.warmup_init_lr > config.optim.learning_rate:
        raise ConfigError(
            f"config.optim.warmup_init_lr={config.optim.warmup_init_lr} must be <= the peak "
            f"config.optim.learning_rate={config.optim.learning_rate}"
        )
    warmup = config.optim.warmup_steps
    if warmup >= config.total_steps:
        raise ConfigError(f"config.optim.warmup_steps={warmup} must be < total_steps={config.total_steps}")
    for name, entry in config.evals.items():
        try:
            plain = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry
            registry.check_entry(name, plain)
        except ValueError as e:
            raise ConfigError(f"config.evals.{e}") from None
    return objective


def _check_clip_bpe(t: Any) -> None:
    """CLIP's BPE has fixed ids: refuse a text tower that would read them differently, before any compute."""
    from veclip_jax.data import bpe  # numpy only; the tokenizer itself loads at the run's start

    want = {"eos_id": bpe.EOS_ID, "pad_id": bpe.PAD_ID}
    for name, value in want.items():
        if t[name] != value:
            raise ConfigError(
                f'config.model.text.{name}={t[name]}: data.tokenizer="clip_bpe" has {name} {value}'
            )
    # vocab_size: the outside-vocab_size check of eos_id (49407) already asks for >= 49,408.


def _check_vision(v: Any) -> None:
    """The image tower's shape fields: the ViT's, or the ResNet's (stages, stem width, pool heads)."""
    if v.type == "vit":
        vit_fields = [(f, _positive, "must be >= 1") for f in ("layers", "mlp_dim")]
        schema.check_ranges(v, vit_fields, "config.model.vision")
        if v.width % v.heads:
            raise ConfigError(f"config.model.vision.width={v.width} is not divisible by heads={v.heads}")
        return
    if len(v.resnet_layers) != 4 or min(v.resnet_layers) < 1:
        raise ConfigError(
            f"config.model.vision.resnet_layers={tuple(v.resnet_layers)}: a ResNet has 4 stages of >= 1 "
            "bottleneck each, e.g. (3, 4, 6, 3) for RN50"
        )
    if v.patch_size != 32:
        raise ConfigError(
            f"config.model.vision.patch_size={v.patch_size}: a ResNet's total stride is 32 (set 32)"
        )
    if (v.width * 32) % v.heads:
        raise ConfigError(
            f"config.model.vision.heads={v.heads} does not divide the attention pool's width "
            f"{v.width * 32} (32 x config.model.vision.width)"
        )


def _check_sources(data: Any) -> None:
    """config.data.sources: entries of SOURCE_FIELDS (absent ones take their default), typed, in range."""
    if data.sources and data.train_files:
        raise ConfigError("config.data.train_files and config.data.sources are both set: use one")
    fields = defaults.SOURCE_FIELDS
    for name, entry in data.sources.items():
        where = f"config.data.sources.{name}"
        if not str(name).isidentifier():
            raise ConfigError(f"{where}: a source name must be an identifier (it names metrics)")
        if not schema.is_section(entry):
            raise ConfigError(f"{where} must be a dict of {', '.join(fields)}")
        schema.check_section(entry, fields, where, unknown=f"is not a source field ({', '.join(fields)})")
        e = {**fields, **entry}
        if not e["files"]:
            raise ConfigError(f"{where}.files is empty: give the source's files (a path spec)")
        schema.check_ranges(e, _SOURCE_RANGES, where)


_SOURCE_RANGES: list[Check] = [
    ("weight", lambda x: x > 0 and math.isfinite(x), "must be > 0"),
    ("vecap_prob", lambda x: x == -1 or 0 <= x <= 1, "must be -1 (= data.vecap_prob) or in [0, 1]"),
]


def _check_hardware_and_data(config: Any) -> None:
    """The mesh and sharding rules, the hardware and its rules, and that data is given where required."""
    if config.mesh.slices < 1:
        raise ConfigError(f"config.mesh.slices={config.mesh.slices}: must be >= 1")
    for i, rule in enumerate(config.sharding_rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"config.sharding_rules[{i}]={rule!r}: a (logical axis, mesh axes) pair")
        axes = rule[1] if isinstance(rule[1], list | tuple) else [rule[1]]
        bad = [a for a in axes if a is not None and a not in MESH_AXES]
        if bad:
            raise ConfigError(f"config.sharding_rules[{i}] ({rule[0]}): {bad} are not mesh axes")
        if rule[0] == "batch" and tuple(axes) != BATCH_AXES:
            raise ConfigError(f"config.sharding_rules: batch must stay on {BATCH_AXES} (the loss)")
    for i, rule in enumerate(config.mesh_rules):
        if len(rule) != 2 or not isinstance(rule[0], str) or not schema.is_section(rule[1]):
            raise ConfigError(f"config.mesh_rules[{i}]: a (regex, {{field: value}}) pair, got {rule!r}")
        for dotted in rule[1]:
            try:
                schema.get(config, dotted)
            except (KeyError, AttributeError):
                raise ConfigError(f"config.mesh_rules[{i}]: config.{dotted} is not a field") from None
    if config.hardware:
        try:
            parse_hardware(config.hardware)
        except UserError as e:
            raise ConfigError(str(e)) from None
    d = config.data
    if d.require_sources and not d.sources:
        raise ConfigError(
            "config.data.sources is empty: this config's corpus is a mixture whose composition was never "
            "released (config.data.require_sources); give its parts as config.data.sources in a config "
            "that imports this one (README: Mixtures), or run its :local variant"
        )
    if not d.allow_demo and not d.train_files and not d.sources:
        raise ConfigError(
            "config.data.train_files (or config.data.sources) is empty and this config does not train on "
            "the demo data (config.data.allow_demo=False): give the corpus, e.g. "
            "--config.data.train_files='/data/vecap/train-*.array_record' "
            "--config.data.tokenizer=/data/spiece.model, or run its :local variant"
        )


def validate_layout(config: Any, num_devices: int, process_count: int) -> None:
    """The checks that need the devices: the mesh fits them; the batch splits over the batch shards,
    the processes and the accumulation steps (ConfigError naming the field otherwise)."""
    from veclip_jax.parallel.mesh import mesh_shape  # imports jax: keep this module light otherwise

    try:
        data, fsdp, _ = mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shards = data * fsdp
    b = config.batch_size
    if b % shards:
        raise ConfigError(f"config.batch_size={b} does not divide over data x fsdp = {shards} batch shards")
    if b % process_count:
        raise ConfigError(f"config.batch_size={b} does not divide over {process_count} processes")
    k = config.optim.grad_accum_steps
    if (b // shards) % k:
        raise ConfigError(
            f"config.optim.grad_accum_steps={k} does not divide the {b // shards} examples per batch shard"
        )
    eb = config.eval_batch_size
    if config.eval_every and (eb % shards or eb % process_count):
        raise ConfigError(
            f"config.eval_batch_size={eb} does not divide over {shards} batch shards "
            f"and {process_count} processes"
        )


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    process_count: int = 1,
) -> Objective:
    """Raises ConfigError naming the first field that is unknown, missing, mistyped or out of range.

    With `num_devices`, also checks that the mesh fits the devices and that the
    batch splits over the batch shards, the processes and the accumulation steps.
    The config is checked as it is: `check_config` applies the hardware's mesh rule first.
    Returns the run's objective, made (once) from config.objective while checking it.
    """
    schema.check_section(
        config,
        _base_config(),
        "config",
        unknown="is not a field of veclip_jax/defaults.py",
        missing="veclip_jax/defaults.py defines it",
        free_form=FREE_FORM,
    )
    objective = _check_ranges(config)
    _check_hardware_and_data(config)
    if num_devices is not None:
        validate_layout(config, num_devices, process_count)
    return objective


def _fingerprint(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(sort_keys=True)


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """A run's config that `check_config` passed, with the hardware's mesh rule applied.

    `train()` given one trusts it and runs only the checks that need the
    devices; given a plain ConfigDict it checks everything. Made only by
    `check_config`; `config` must not change afterwards (`verified` refuses it
    if it did, rather than train an unchecked config).
    """

    config: ml_collections.ConfigDict
    objective: Objective  # config.objective's, made once: the run's input, model, step and evals serve it
    mesh_rule: str | None  # the regex of config.mesh_rules that matched config.hardware, if any
    fingerprint: str = dataclasses.field(repr=False)

    def verified(self) -> ml_collections.ConfigDict:
        """The checked config; ConfigError if it was changed after the check."""
        if _fingerprint(self.config) != self.fingerprint:
            raise ConfigError(
                "the config changed after check_config: check it again (or pass a plain config)"
            )
        return self.config


def check_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    process_count: int = 1,
    keep: Collection[str] = (),
) -> CheckedConfig:
    """A run's config, checked once: the hardware's mesh rule applied (the given config is not
    changed; fields named in `keep`, those the user set on the command line, are not overwritten:
    parallel/hardware.py `apply_mesh_rules`), then every check of `validate_config` (with the
    devices' when `num_devices` is given).

    Raises ConfigError (or UserError for a rule naming no field) before anything is computed.
    """
    config, rule = apply_mesh_rules(config, keep)
    objective = validate_config(config, num_devices=num_devices, process_count=process_count)
    return CheckedConfig(config, objective, rule, _fingerprint(config))


def check_overrides(argv: list[str], flag: str = "config") -> None:
    """Refuses `--config.FIELD=...` arguments that name no field of veclip_jax/defaults.py.

    ml_collections would raise a bare AttributeError deep in flag parsing;
    this names the argument and suggests the closest field.
    """
    base = _base_config()
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        dotted = arg[len(flag) + 3 :].split("=", 1)[0]
        node, seen = base, []
        for part in dotted.split("."):
            if ".".join(seen) in FREE_FORM:
                break
            if not schema.is_section(node) or part not in node:
                close = schema.suggestion(part, node) if schema.is_section(node) else None
                hint = f" (did you mean --{flag}.{'.'.join([*seen, close])}?)" if close else ""
                raise ConfigError(f"{arg}: config.{dotted} is not a field of veclip_jax/defaults.py{hint}")
            node = node[part]
            seen.append(part)
