"""Configs: every experiment file is valid and unchanged; bad fields are refused fast, by name."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from veclip_jax import defaults
from veclip_jax.config import ConfigError, check_overrides, validate_config
from veclip_jax.recipes import declip as recipes_declip
from veclip_jax.recipes import veclip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden_configs")
EXPERIMENTS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


# Named variants of experiment files (`--config=configs/demo.py:alttext`), each with its golden file.
VARIANTS = {"demo": ["alttext", "vecap"], "base": ["B/16", "L/14", "H/14", "RN50"]}
NAMED = EXPERIMENTS + [f"{name}:{arg}" for name, args in VARIANTS.items() for arg in args]


def _load(name: str):
    module, _, arg = name.partition(":")
    get_config = importlib.import_module(f"configs.{module}").get_config
    return get_config(arg) if arg else get_config()


# Paper configs need their corpus to validate (tests/test_paper_configs.py); their :local variants do not.
PAPER = (
    sorted(veclip.RUNS)
    + [f"yfcc15m_{o}_vitb32" for o in recipes_declip.RECIPES]
    + [f"yfcc15m_{o}_r50" for o in recipes_declip.RECIPES_R50]
    + [f"declip88m_declip_{t}" for t in recipes_declip.DECLIP88M]
)
VALID = [n for n in NAMED if n not in PAPER] + [f"{n}:local" for n in PAPER]


@pytest.mark.parametrize("name", VALID)
def test_every_config_file_is_valid(name):
    validate_config(_load(name))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_files_import_only_the_package(name):
    """Experiment files load from any directory (the installed package): they never import each other."""
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
        source = f.read()
    assert "from configs" not in source and "import configs" not in source


@pytest.mark.parametrize("name", NAMED)
def test_config_matches_its_golden_file(name):
    """A config change shows in review: regenerate with UPDATE_GOLDEN=1 pytest tests/test_config.py."""
    text = _load(name).to_json_best_effort(indent=1, sort_keys=True) + "\n"
    path = os.path.join(GOLDEN, name.replace(":", "_").replace("/", "") + ".json")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert json.loads(f.read()) == json.loads(text), f"configs/{name}.py changed: update {path}"


@pytest.mark.parametrize("size", sorted(defaults.MODEL_SIZES))
def test_every_model_size_is_valid(size):
    validate_config(defaults.get_config(size))


def _with(**changes):
    """The base config with fields changed (a__b means config.a.b), built as a new ConfigDict:
    ml_collections' own type check on assignment is what a hand-built config lacks."""
    d = defaults.get_config().to_dict()
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = d
        for p in path:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(data__vecap_prob=1.5), "config.data.vecap_prob"),
        (dict(data__max_bad_fraction=-0.1), "config.data.max_bad_fraction"),
        (dict(batch_size=0), "config.batch_size"),
        (dict(total_steps=0), "config.total_steps"),
        (dict(log_every=0), "config.log_every"),
        (dict(eval_every=-1), "config.eval_every"),
        (dict(keep_checkpoints=0), "config.keep_checkpoints"),
        (dict(optim__warmup_steps=500), "config.optim.warmup_steps"),
        (dict(optim__learning_rate=0.0), "config.optim.learning_rate"),
        (dict(optim__b2=1.0), "config.optim.b2"),
        (dict(data__crop_scale=(0.9, 1.5)), "config.data.crop_scale"),
        (dict(model__vision__patch_size=5), "config.model.vision.image_size"),
        (dict(model__text__heads=3), "config.model.text.width"),
        (dict(model__text__eos_id=5000), "config.model.text.eos_id"),
        (dict(model__dtype="float16"), "config.model.dtype"),
        (dict(mesh__data=0), "config.mesh.data"),
        (dict(evals__demo_retrieval__caption_field="caption"), "config.evals.demo_retrieval.caption_field"),
        (dict(evals__demo_color__type="zero_shot"), "config.evals.demo_color.type"),
        (dict(evals__demo_color__every=-5), "config.evals.demo_color.every"),
        (dict(evals__demo_color__dataset="imagenet"), "config.evals.demo_color.dataset"),
        (dict(evals__demo_color__recall_at=(1,)), "config.evals.demo_color.recall_at is not a field"),
        (dict(evals__demo_retrieval__recall_at=(0,)), "config.evals.demo_retrieval.recall_at"),
        (dict(evals__demo_color__max_examples="10"), "config.evals.demo_color.max_examples='10': expected"),
    ],
)
def test_out_of_range_values_are_refused_by_name(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(_with(**changes))


def test_wrong_types_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"config\.batch_size='64': expected int"):
        validate_config(_with(batch_size="64"))
    with pytest.raises(ConfigError, match=r"config\.data\.vecap_prob='0.5': expected float"):
        validate_config(_with(data__vecap_prob="0.5"))
    validate_config(_with(data__vecap_prob=1))  # an int where a float is expected is fine


def test_unknown_and_missing_fields_are_refused_by_name():
    c = defaults.get_config()
    c.data.vecap_probability = 0.5
    with pytest.raises(
        ConfigError, match=r"config\.data\.vecap_probability is not a field.*data\.vecap_prob\?"
    ):
        validate_config(c)
    c = defaults.get_config()
    del c.data["tokenizer"]
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer is missing"):
        validate_config(c)


def test_evals_are_a_free_form_registry_whose_entries_are_checked():
    c = defaults.get_config()
    c.evals.imagenet = dict(type="zeroshot_classification", dataset="tfds:imagenet2012", split="validation",
                            classnames="imagenet1k", templates="clip_80", every=5000)  # fmt: skip
    c.evals.texture = dict(
        type="zeroshot_classification", dataset="folder:/data/dtd", templates=("a {} surface.",)
    )
    c.evals.probe = dict(type="linear_probe", dataset="tfds:cifar10", split="test", train_split="train")
    validate_config(c)
    c.evals.texture.templates = ("no placeholder",)
    with pytest.raises(ConfigError, match=r"config\.evals\.texture\.templates"):
        validate_config(c)
    c = defaults.get_config()
    c.evals = {}  # no evaluation at all
    validate_config(c)


@pytest.mark.parametrize(
    "changes, devices, match",
    [
        (dict(mesh__data=3), 8, r"config\.mesh"),
        (dict(mesh__fsdp=2, mesh__data=2), 8, r"covers 4 devices"),
        (dict(batch_size=60), 8, r"config\.batch_size=60 does not divide over data x fsdp = 8"),
        (dict(optim__grad_accum_steps=3), 8, r"config\.optim\.grad_accum_steps=3"),
        (dict(eval_batch_size=100), 8, r"config\.eval_batch_size=100"),
    ],
)
def test_a_mesh_or_batch_that_does_not_fit_is_refused(changes, devices, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_with(**changes), num_devices=devices)


def test_override_of_an_unknown_field_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"--config\.batchsize=8: .*did you mean --config\.batch_size\?"):
        check_overrides(["train.py", "--config.batchsize=8"])
    with pytest.raises(ConfigError, match=r"did you mean --config\.data\.vecap_prob\?"):
        check_overrides(["train.py", "--config.data.vecap_probs=0"])
    check_overrides(["train.py", "--config.data.vecap_prob=0", "--config.evals.demo_color.every=7"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.batchsize=8", "config.batchsize is not a field"),
        ("--config.batch_size=abc", "--config.batch_size=abc"),
        ("--config.data.vecap_prob=1.5", "config.data.vecap_prob=1.5"),
        ("--config.mesh.data=3", "config.mesh="),  # 3 of the 8 (fake) devices
        ("--config.batch_size=12", "config.batch_size=12 does not divide"),
    ],
)
def test_launch_refuses_bad_config_before_any_compute(override, message, tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}", override],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "cache").exists()  # no demo data generated, nothing computed


def test_real_data_without_its_tokenizer_is_refused():
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer is empty"):
        validate_config(_with(data__train_files="/data/train-*.array_record"))


def test_objective_defaults_are_the_objective_classes_fields():
    """config.objective.NAME is generated from objective NAME's dataclass: same fields, types, values."""
    import dataclasses

    from veclip_jax.objectives import REGISTRY, Objective

    fixed = {f.name for f in dataclasses.fields(Objective)}
    objective = defaults.get_config().objective.to_dict()
    for name, cls in REGISTRY.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in fixed}
        assert objective.get(name, {}) == fields, name
        assert all(type(objective[name][k]) is type(v) for k, v in fields.items()), name
    assert set(objective) == {"name"} | {n for n in REGISTRY if n != "clip"}


def test_the_defaults_and_the_checker_import_no_jax():
    """Experiment files import the defaults; the CLI checks a config before JAX starts."""
    code = (
        "import sys; import veclip_jax.defaults, veclip_jax.schema, veclip_jax.parallel.axes, "
        "veclip_jax.parallel.hardware, veclip_jax.eval.registry; assert 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(
    "changes, match",
    [  # the one checker, through its three users: a config field, an evaluation entry, an objective field
        (dict(seed=1.5), r"config\.seed=1\.5: expected int, got float"),
        (
            dict(evals__demo_color__every=1.5),
            r"config\.evals\.demo_color\.every=1\.5: expected int, got float",
        ),
        (
            dict(objective__declip__queue_size=1.5),
            r"config\.objective\.declip\.queue_size=1\.5: expected int",
        ),
        (
            dict(objective__declip__queue_sise=4),
            r"config\.objective\.declip\.queue_sise is not a field.*queue_size\?",
        ),
    ],
)
def test_one_checker_names_the_full_dotted_field(changes, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_with(**changes))


def test_make_objective_checks_its_section_with_the_same_checker():
    from veclip_jax.objectives import make_objective

    section = ml_collections.ConfigDict(dict(name="declip", declip=dict(queue_size="big")))
    with pytest.raises(ConfigError, match=r"config\.objective\.declip\.queue_size='big': expected int"):
        make_objective(section)
    section = ml_collections.ConfigDict(dict(name="slip", slip=dict(ssl_weigth=1.0)))
    with pytest.raises(
        ConfigError, match=r"config\.objective\.slip\.ssl_weigth is not a field.*ssl_weight\?"
    ):
        make_objective(section)
    assert (
        make_objective(ml_collections.ConfigDict(dict(name="slip", slip=dict(ssl_weight=2)))).ssl_weight
        == 2.0
    )
