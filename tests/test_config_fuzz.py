"""Property test: whatever a user types as overrides or YAML, loading ends in a Config or a UserError."""

import dataclasses
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_lowp.config import Config, load_config
from megatron_lowp.errors import UserError
from megatron_lowp.precision import available_recipes
from tests.conftest import examples


def dotted_keys(cls, prefix=""):
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from dotted_keys(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


KEYS = sorted(dotted_keys(Config)) + ["train.nope", "nosection.key", "model", "train.steps.deeper"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["auto", "never", "bf16", "tiny", "1e-3", "cosine", "[1, 2", "{a: 1}"]),
)


def load_or_user_error(loader):
    try:
        cfg = loader()
    except UserError as e:
        assert str(e).strip()  # a message, not an empty error
        return None
    assert isinstance(cfg, Config)
    return cfg


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), SCALARS), max_size=4))
def test_random_overrides(pairs):
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in pairs]
    load_or_user_error(lambda: load_config(None, overrides, extra_choices={"precision.recipe": available_recipes()}))


NESTED = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(["train", "steps", "model", "x"]), inner, max_size=3)),
                      max_leaves=10)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.dictionaries(st.sampled_from(["run", "train", "model", "optim", "extends", "junk"]), NESTED, max_size=4),
                 NESTED))
def test_random_recipe_files(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    load_or_user_error(lambda: load_config(path))


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "bytes.yaml"
    path.write_bytes(data)
    load_or_user_error(lambda: load_config(path))
