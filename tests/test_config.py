"""Recipe loading: extends, presets, overrides, and the errors users see for their mistakes."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from megatron_lowp.config import dump_config, load_config, parse_override
from megatron_lowp.errors import UserError
from megatron_lowp.precision import available_recipes


def write(path, text):
    path.write_text(text)
    return path


def test_shipped_recipes_load(repo):
    quick = load_config(repo / "recipes/quickstart.yaml")
    base = load_config(repo / "recipes/tiny/bf16.yaml")
    assert quick.run.name == "quickstart" and base.run.name == "tiny-bf16"
    assert quick.model == base.model  # the quickstart is the baseline, shorter
    assert (quick.model.d_model, quick.model.n_layers, quick.model.n_kv_heads) == (256, 4, 2)
    assert quick.train.steps == 200 and base.train.steps == 300


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("recipe, baseline", [("fp8", "bf16"), ("fp4", "bf16"), ("ngpt_fp4", "ngpt_bf16")])
def test_tiny_recipes_differ_from_their_baseline_only_in_what_the_recipe_changes(repo, recipe, baseline):
    """Fair comparisons: a low-precision tiny recipe changes its run name, precision settings and the
    keys of its recipe package (configs/precision/<name>.yaml, e.g. fp8's Adam moments), nothing else."""
    import yaml

    from megatron_lowp.config import config_to_dict
    from megatron_lowp.precision import available_recipes

    choices = {"precision.recipe": available_recipes()}
    low = _flat(config_to_dict(load_config(repo / f"recipes/tiny/{recipe}.yaml", extra_choices=choices)))
    base = _flat(config_to_dict(load_config(repo / f"recipes/tiny/{baseline}.yaml", extra_choices=choices)))
    package = _flat(yaml.safe_load((repo / f"configs/precision/{recipe}.yaml").read_text()))
    changed = {k for k in low if low[k] != base[k]}
    assert changed, "the recipe changes nothing"
    allowed = {"run.name"} | set(package)
    assert {k for k in changed if not k.startswith("precision.")} <= allowed


@pytest.mark.parametrize("path", sorted(str(p.relative_to(Path(__file__).resolve().parents[1]))
                                        for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")))
def test_every_shipped_recipe_loads_and_builds(repo, path):
    """Every recipe file resolves; its precision recipe and model build (paper-scale models on the
    meta device: only shapes), and the Llama-2-7B ones have Llama-2-7B's parameter count."""
    import torch

    from megatron_lowp.device import get_device
    from megatron_lowp.model import build_model
    from megatron_lowp.precision import available_recipes, build_recipe

    cfg = load_config(repo / path, ["model.vocab_size=32000"], extra_choices={"precision.recipe": available_recipes()})
    recipe = build_recipe(cfg, get_device("cpu"))
    with torch.device("meta"):
        model = build_model(cfg.model, recipe)
    if "llama2_7b" in path:
        assert model.num_params() == 6_738_415_616


def test_extends_order_and_lists(tmp_path):
    write(tmp_path / "a.yaml", "train: {steps: 10, seq_len: 64}\noptim: {lr: 0.5}\n")
    write(tmp_path / "b.yaml", "train: {steps: 20}\n")
    write(tmp_path / "r.yaml", "extends: [a.yaml, b.yaml]\ntrain: {log_every: 3}\n")
    cfg = load_config(tmp_path / "r.yaml", ["optim.lr=3e-4"])
    assert cfg.train.steps == 20  # later base wins
    assert cfg.train.seq_len == 64  # kept from the first base
    assert cfg.train.log_every == 3  # the file itself wins over its bases
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; the schema makes it a float


def test_extends_cycle(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_names_file_and_allowed(tmp_path):
    path = write(tmp_path / "r.yaml", "train:\n  stpes: 10\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "train.stpes" in msg and "did you mean 'train.steps'" in msg
    assert "micro_batch_size" in msg  # the allowed keys are listed


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match="unknown key 'trian'.*allowed in the top level: run, model"):
        load_config(write(tmp_path / "r.yaml", "trian: {steps: 1}\n"))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(UserError, match=r"r.yaml: train.steps: 'ten' has the wrong type.*an integer >= 1"):
        load_config(write(tmp_path / "r.yaml", "train: {steps: ten}\n"))
    with pytest.raises(UserError, match=r"train.steps: -5 is out of range; expected an integer >= 1"):
        load_config(write(tmp_path / "r.yaml", "train: {steps: -5}\n"))
    with pytest.raises(UserError, match=r"optim.beta2: 1.5 is out of range.*<= 1"):
        load_config(None, ["optim.beta2=1.5"])
    with pytest.raises(UserError, match=r"train.grad_clip: nan is not a finite number"):
        load_config(None, ["train.grad_clip=.nan"])
    with pytest.raises(UserError, match=r"logging.tensorboard: 'yes please' has the wrong type.*true/false"):
        load_config(None, ["logging.tensorboard=yes please"])


def test_choices_listed(tmp_path):
    with pytest.raises(UserError, match=r"command line: optim.schedule: 'linear' is not allowed; expected one of cosine, wsd, constant"):
        load_config(None, ["optim.schedule=linear"])
    with pytest.raises(UserError, match=r"device.type: 'tpu' is not allowed; expected one of auto, cpu"):
        load_config(None, ["device.type=tpu"])
    with pytest.raises(UserError, match=r"precision.recipe: 'fp9' is not allowed; expected one of bf16"):
        load_config(None, ["precision.recipe=fp9"], extra_choices={"precision.recipe": available_recipes()})


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="'train' must be a section"):
        load_config(write(tmp_path / "r.yaml", "train: 5\n"))


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"bad.yaml: invalid YAML at line 2, column 10: mapping values are not allowed"):
        load_config(write(tmp_path / "bad.yaml", "train:\n  steps: : 3\n"))
    (tmp_path / "latin1.yaml").write_bytes(b"run: {name: caf\xe9}\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(UserError, match="extends.*not found|not found"):
        load_config(write(tmp_path / "ext.yaml", "extends: nowhere.yaml\n"))


def test_override_parsing():
    assert parse_override("train.steps=200") == ("train.steps", 200)
    assert parse_override("run.out_dir=/tmp/x") == ("run.out_dir", "/tmp/x")
    assert parse_override("model.vocab_size=null") == ("model.vocab_size", None)
    assert parse_override("logging.tensorboard=true") == ("logging.tensorboard", True)
    with pytest.raises(UserError, match="expected section.key=value"):
        parse_override("train.steps")


def test_preset_fills_dims_and_command_line_switches_it(repo, tmp_path):
    cfg = load_config(repo / "recipes/quickstart.yaml", ["model.preset=125m"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (768, 12, 12)
    # explicit dimensions beat the preset
    cfg = load_config(repo / "recipes/quickstart.yaml", ["model.preset=7b", "model.n_layers=2"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (4096, 2, 32000)
    # a recipe that extends the preset file directly can still switch preset
    write(tmp_path / "r.yaml", f"extends: {repo}/configs/model/tiny.yaml\n")
    assert load_config(tmp_path / "r.yaml", ["model.preset=350m"]).model.d_model == 1024
    with pytest.raises(UserError, match=r"model.preset: 'huge' is not a preset.*allowed: 125m, 1b, 350m, 7b, tiny"):
        load_config(None, ["model.preset=huge"])


def test_cross_field_rules():
    with pytest.raises(UserError, match=r"train.global_batch_size: 10 must be a multiple of train.micro_batch_size \(4\)"):
        load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=10"])
    with pytest.raises(UserError, match="divisible by n_heads"):
        load_config(None, ["model.d_model=100", "model.n_heads=3"])
    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        load_config(None, ["model.n_heads=4", "model.n_kv_heads=3"])
    with pytest.raises(UserError, match="exceeds model.max_seq_len"):
        load_config(None, ["train.seq_len=4096", "model.max_seq_len=2048"])
    with pytest.raises(UserError, match="stop_at_step: 20 is after the last step"):
        load_config(None, ["train.steps=10", "train.stop_at_step=20"])
    with pytest.raises(UserError, match="run.resume: '/no/such/ckpt' is neither auto, never"):
        load_config(None, ["run.resume=/no/such/ckpt"])
    with pytest.raises(UserError, match="run.name"):
        load_config(None, ["run.name=../escape"])


def test_dump_reloads_to_the_same_config(repo, tmp_path):
    cfg = load_config(repo / "recipes/tiny/bf16.yaml", ["train.steps=70", "optim.schedule=wsd"])
    path = write(tmp_path / "resolved.yaml", dump_config(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 70


def test_named_recipe_brings_its_package_and_each_part_can_be_switched_off(repo):
    choices = {"precision.recipe": available_recipes()}
    fp8 = load_config(repo / "recipes/tiny/fp8.yaml", extra_choices=choices)
    assert fp8.precision.smooth_swiglu is True
    assert (fp8.precision.x.format, fp8.precision.dy.format, fp8.precision.dy.rounding) == ("fp8_e4m3", "fp8_e5m2", "stochastic")
    assert fp8.precision.w_t.amax == "delayed" and fp8.precision.x_t.power_of_two is True
    ablated = load_config(repo / "recipes/tiny/fp8.yaml", ["precision.smooth_swiglu=false", "precision.dy.rounding=nearest"],
                          extra_choices=choices)
    assert ablated.precision.smooth_swiglu is False and ablated.precision.dy.rounding == "nearest"
    assert ablated.precision.x.format == "fp8_e4m3"  # the rest of the package stays
    back = load_config(repo / "recipes/tiny/fp8.yaml", ["precision.recipe=bf16"], extra_choices=choices)
    assert back.precision.x.format is None and back.precision.smooth_swiglu is False  # no fp8 defaults left
    base = load_config(repo / "recipes/tiny/bf16.yaml", extra_choices=choices)
    assert (fp8.model, fp8.train, fp8.data) == (base.model, base.train, base.data)
    assert fp8.optim.moments == "fp8" and dataclasses.replace(fp8.optim, moments="fp32") == base.optim
    no_fp8_moments = load_config(repo / "recipes/tiny/fp8.yaml", ["optim.moments=fp32"], extra_choices=choices)
    assert no_fp8_moments.optim.moments == "fp32" and no_fp8_moments.precision.x.format == "fp8_e4m3"
