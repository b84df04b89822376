"""Load a recipe: YAML files with `extends:`, model presets, `key.sub=value` overrides, validation.

Order of precedence, lowest first: schema defaults < model preset (`model.preset`) < base files named
by `extends:` (earlier < later) < the recipe file itself < a precision plan (`--plan`, written by
`megatron-lowp probe`; precision keys only) < command-line overrides. Every key remembers where it
was set, so an error names the file (or "command line") that set the bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_lowp.config.schema import Config
from megatron_lowp.errors import UserError

COMMAND_LINE = "command line"
# Shipped inside the package (megatron_lowp/configs; the repository's top-level configs/ is a link to
# it, so the files people read and edit are the ones that ship).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESET_DIR = CONFIGS_DIR / "model"
# A named precision recipe's package (e.g. fp8: its role formats, Smooth-SwiGLU, FP8 moments), as
# defaults under whatever the recipe file or the command line sets, so each part can be switched off.
RECIPE_DEFAULTS_DIR = CONFIGS_DIR / "precision"


def read_yaml(path: Path) -> dict:
    """A YAML file that must hold a mapping; every failure is a UserError naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path}: cannot read recipe file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{path}: invalid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections (run:, model:, ...), got {type(data).__name__}")
    return data


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty mapping stays a leaf so it can be validated."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Flat values and their source files for `path` with its `extends:` resolved."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"{path}: extends: cycle ({cycle})")
    data = read_yaml(path)
    bases = data.pop("extends", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: extends: must be a file path or a list of file paths")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in bases:
        base_values, base_sources = _load_layers(path.parent / base, (*chain, path))
        values.update(base_values)
        sources.update(base_sources)
    for key, value in _flatten(data).items():
        values[key] = value
        sources[key] = str(path)
    return values, sources


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=200` -> ('train.steps', 200); the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise UserError(f"override '{text}': expected section.key=value, e.g. train.steps=200")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw  # a plain string that happens to look odd to YAML
    return key, value


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _apply_preset(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Fill model dimensions from configs/model/<preset>.yaml under the explicitly set ones."""
    name = values.get("model.preset")
    if name is None:
        return
    path = PRESET_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise UserError(
            f"{sources.get('model.preset')}: model.preset: '{name}' is not a preset in {PRESET_DIR}; "
            f"allowed: {', '.join(available_presets()) or '(none found)'}"
        )
    # Keys that came from some preset file (e.g. a recipe extending configs/model/tiny.yaml) give
    # way to the named preset, so `model.preset=1b` on the command line really switches size.
    for key in [k for k, src in sources.items() if k.startswith("model.") and Path(src).parent == PRESET_DIR]:
        if key != "model.preset":
            del values[key], sources[key]
    _fill_defaults(values, sources, path)


# Keys of earlier versions, with what replaces them.
REMOVED_KEYS = {
    "train.eval_iters": "set train.eval_samples (the number of validation sequences; eval_iters x "
                        "micro_batch_size before) and train.eval_batch_size, so the validation set no longer "
                        "depends on the batch layout",
}

# Alternative ways to set one thing: a recipe package's default gives way when the user sets any of them.
EXCLUSIVE_KEYS = (("precision.qaf.start_step", "precision.qaf.start_tokens", "precision.qaf.start_fraction"),)


def _fill_defaults(values: dict[str, Any], sources: dict[str, str], path: Path) -> None:
    """Keys of the YAML file `path` (with its `extends:`) go in under the ones already set (and under
    any alternative to them)."""
    layer_values, layer_sources = _load_layers(path)
    for key, value in layer_values.items():
        group = next((g for g in EXCLUSIVE_KEYS if key in g), (key,))
        if not any(k in values for k in group):
            values[key] = value
            sources[key] = layer_sources[key]


def _apply_recipe_defaults(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Fill keys from configs/precision/<precision.recipe>.yaml (if the recipe has one) under the
    explicitly set ones. Defaults of another recipe (from a file that extends one) give way first."""
    name = values.get("precision.recipe")
    for key in [k for k, src in sources.items() if Path(src).parent == RECIPE_DEFAULTS_DIR]:
        del values[key], sources[key]
    path = RECIPE_DEFAULTS_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        from megatron_lowp.precision import recipes_with_packages  # the registry, read when a recipe is loaded

        if name in recipes_with_packages():  # never train something else under the recipe's name
            raise UserError(f"{sources.get('precision.recipe', 'default')}: precision.recipe: '{name}' needs its "
                            f"package {path}, which is missing from this installation (a broken install: "
                            "reinstall megatron-lowp)")
        return
    _fill_defaults(values, sources, path)


def _unflatten(values: dict[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in values.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{dotted}: '{p}' is a value, not a section")
        node[leaf] = value
    return tree


def _choices(f: dataclasses.Field, extra: dict[str, tuple], dotted: str) -> tuple | None:
    """The allowed values of a field: given by the caller, listed in the schema, or read from the
    registry the schema names (`choice_from`)."""
    if dotted in extra:
        return tuple(extra[dotted])
    source = f.metadata.get("choices_from")
    if source is None:
        return f.metadata.get("choices")
    module, _, name = source.partition(":")
    registry = getattr(importlib.import_module(module), name)
    registry = registry() if callable(registry) else registry
    return tuple(registry)


def _describe_allowed(f: dataclasses.Field, tp: Any, extra: dict[str, tuple], dotted: str) -> str:
    meta = f.metadata
    choices = _choices(f, extra, dotted)
    if choices:
        return "one of " + ", ".join("null" if c is None else str(c) for c in choices)
    bounds = [f">= {meta['ge']}" if meta.get("ge") is not None else "",
              f"> {meta['gt']}" if meta.get("gt") is not None else "",
              f"<= {meta['le']}" if meta.get("le") is not None else ""]
    bounds_text = " and ".join(b for b in bounds if b)
    kind = _type_name(tp)
    return f"{kind} {bounds_text}".strip()


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            keys = ", ".join(f.name for f in dataclasses.fields(item))
            return f"a list of mappings (each with keys {keys})"
        return f"a list (each {_type_name(item)})"
    names = []
    for t in _type_options(tp):
        if typing.get_origin(t) is list:
            names.append(_type_name(t))
            continue
        names.append("null" if t is type(None) else {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(t, getattr(t, "__name__", str(t))))
    return " or ".join(names)


def _type_options(tp: Any) -> tuple:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _dataclass_list_item(tp: Any) -> type | None:
    """The item class when `tp` is (or has the option) list[SomeDataclass], e.g. data.train's blend."""
    for option in _type_options(tp):
        if typing.get_origin(option) is list and dataclasses.is_dataclass(typing.get_args(option)[0]):
            return typing.get_args(option)[0]
    return None


def _build_items(cls: type, value: list, src: str, extra: dict[str, tuple], dotted: str, allowed: str) -> list:
    """A list of mappings, each checked like a section; errors name the item, e.g. data.train[1].weight."""
    if not value:
        raise UserError(f"{src}: {dotted}: an empty list; expected {allowed}")
    items = []
    for i, item in enumerate(value):
        where = f"{dotted}[{i}]"
        if not isinstance(item, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(cls))
            raise UserError(f"{src}: {where}: {item!r} must be a mapping with keys {keys}")
        items.append(_build(cls, item, {}, extra, where + ".", src=src))
    return items


def _coerce(value: Any, tp: Any) -> Any:
    """The value as type `tp`, or raise ValueError. Ints are accepted for floats, and so are
    strings like '3e-4' (YAML 1.1 reads a float without a dot as a string)."""
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {type(value).__name__}")
        return [_coerce(item, typing.get_args(tp)[0]) for item in value]
    options = _type_options(tp)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError("must not be null")
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, str):
            return value
        if t is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"has the wrong type ({type(value).__name__})")


def _check_value(value: Any, f: dataclasses.Field, extra: dict[str, tuple], dotted: str) -> None:
    meta = f.metadata
    choices = _choices(f, extra, dotted)
    if choices and value not in choices:
        raise ValueError("is not allowed")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("is not a finite number")
        if meta.get("ge") is not None and value < meta["ge"]:
            raise ValueError("is out of range")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ValueError("is out of range")
        if meta.get("le") is not None and value > meta["le"]:
            raise ValueError("is out of range")


def _build(cls: type, tree: dict, sources: dict[str, str], extra: dict[str, tuple], prefix: str = "",
           src: str | None = None):
    """`cls` from a mapping; `src` (where the whole mapping was set, e.g. a list item) overrides the per-key sources."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        where_set = src or sources.get(dotted) or next(
            (s for k, s in sources.items() if k.startswith(dotted + ".")), COMMAND_LINE)
        if dotted in REMOVED_KEYS:
            raise UserError(f"{where_set}: '{dotted}' was removed: {REMOVED_KEYS[dotted]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            where = prefix.rstrip(".") or "the top level"
            raise UserError(f"{where_set}: unknown key '{dotted}'{hint}; allowed in {where}: {', '.join(fields)}")
        f = fields[key]
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where_set}: '{dotted}' must be a section (a mapping), got {value!r}")
            kwargs[key] = _build(tp, value, sources, extra, dotted + ".")
            continue
        item_cls = _dataclass_list_item(tp)
        if item_cls is not None and isinstance(value, list):
            kwargs[key] = _build_items(item_cls, value, where_set, extra, dotted,
                                       _describe_allowed(f, tp, extra, dotted))
            continue
        try:
            value = _coerce(value, tp)
            _check_value(value, f, extra, dotted)
        except ValueError as e:
            raise UserError(
                f"{where_set}: {dotted}: {value!r} {e}; expected {_describe_allowed(f, tp, extra, dotted)}"
            ) from None
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = prefix.rstrip(".") or "the top level"
        raise UserError(f"{src or COMMAND_LINE}: {where}: missing key '{missing[0]}'; "
                        f"required: {', '.join(f.name for f in dataclasses.fields(cls))}")
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    """Rules that involve more than one key."""

    def fail(key: str, message: str) -> None:
        raise UserError(f"{sources.get(key, 'default')}: {key}: {message}")

    m, t, o = cfg.model, cfg.train, cfg.optim
    if m.d_model % m.n_heads:
        fail("model.n_heads", f"d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads})")
    if (m.d_model // m.n_heads) % 2:
        fail("model.n_heads", f"head dimension d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        fail("model.n_kv_heads", f"n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({m.n_kv_heads})")
    if t.global_batch_size % t.micro_batch_size:
        fail("train.global_batch_size",
             f"{t.global_batch_size} must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
    if t.seq_len > m.max_seq_len:
        fail("train.seq_len", f"{t.seq_len} exceeds model.max_seq_len ({m.max_seq_len})")
    if t.stop_at_step is not None and t.stop_at_step > t.steps:
        fail("train.stop_at_step", f"{t.stop_at_step} is after the last step (train.steps = {t.steps})")
    if t.compile and t.activation_checkpointing != "none":
        # measured: a compiled block under checkpointing trains on other numbers than either alone (docs/compile.md)
        fail("train.compile", f"true with train.activation_checkpointing: {t.activation_checkpointing} is not "
             "supported yet; allowed: one of the two (train.compile=false or train.activation_checkpointing=none)")
    if o.warmup_steps > t.steps:
        fail("optim.warmup_steps", f"{o.warmup_steps} exceeds train.steps ({t.steps})")
    if o.min_lr > o.lr:
        fail("optim.min_lr", f"{o.min_lr} exceeds optim.lr ({o.lr})")
    qaf_starts = [k for k in EXCLUSIVE_KEYS[0] if _get(cfg, k) is not None]
    if len(qaf_starts) > 1:
        fail(qaf_starts[1], f"set only one of {', '.join(EXCLUSIVE_KEYS[0])} (also set: {qaf_starts[0]})")
    if cfg.precision.qaf.auto and not cfg.precision.grad_noise.every:
        fail("precision.qaf.auto", "needs the gradient-noise monitor: set precision.grad_noise.every > 0")
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        fail("run.resume", f"'{cfg.run.resume}' is neither auto, never, nor an existing checkpoint path")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        fail("run.name", f"'{cfg.run.name}' must be a plain directory name (no '/')")


def _apply_plan(values: dict[str, Any], sources: dict[str, str], plan: Path) -> None:
    """A plan file's keys (with its `extends:`) over the recipe's; a plan decides precision only."""
    if not plan.is_file():
        raise UserError(f"{plan}: --plan: plan file not found (megatron-lowp probe ... --out DIR writes DIR/plan.yaml)")
    plan_values, plan_sources = _load_layers(plan)
    for key, value in plan_values.items():
        if not key.startswith("precision."):
            raise UserError(f"{plan_sources[key]}: --plan: a precision plan sets precision.* keys only, not '{key}'; "
                            "put other settings in the recipe or on the command line")
        values[key] = value
        sources[key] = plan_sources[key]


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    extra_choices: dict[str, tuple] | None = None,
    plan: str | Path | None = None,
) -> Config:
    """The validated `Config` for a recipe file (or schema defaults when `path` is None).

    `extra_choices` adds allowed values known only at run time, e.g. the registered precision
    recipes: {"precision.recipe": ("bf16", ...)}. `plan`: a precision plan file (`megatron-lowp
    probe` writes plan.yaml) applied over the recipe and under the overrides.
    """
    values, sources = _load_layers(Path(path)) if path is not None else ({}, {})
    if plan is not None:
        _apply_plan(values, sources, Path(plan))
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
        sources[key] = COMMAND_LINE
    _apply_preset(values, sources)
    _apply_recipe_defaults(values, sources)
    cfg = _build(Config, _unflatten(values), sources, extra_choices or {})
    _validate(cfg, sources)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML; loading it again gives the same Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
