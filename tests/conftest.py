import os
import sys
from pathlib import Path

import pytest

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
