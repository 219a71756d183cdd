"""Test-wide settings: no hub, no network, no W&B upload; caches in a per-session temp folder."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(root / "hf"),
            "KULLM_CACHE": str(root / "kullm"),
            "WANDB_MODE": "disabled",
            "WANDB_DIR": str(root / "wandb"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    os.environ.pop("WANDB_API_KEY", None)
    yield
    os.environ.clear()
    os.environ.update(saved)
