import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # Tests never reach a network; wandb must run offline if a test enables it.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    # One embedded-corpus cache for the whole session, outside the user's home.
    os.environ.setdefault("MEGATRON_LOWP_CACHE", str(tmp_path_factory.mktemp("cache")))


# CI is not a lottery: property tests draw the same examples on every run (derandomize). A wider,
# random search is an opt-in run: HYPOTHESIS_PROFILE=wide python -m pytest tests/test_hostile_input.py
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("wide", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """A property test's example count: n in the default run, 20 n in the wide search."""
    return n * 20 if settings.default.max_examples >= 1000 else n
