"""Test-wide settings: no hub, no network, no W&B upload; caches in a per-session temp folder. And the fixtures
several test modules share (the helpers they share are in ``helpers.py``).

Set at import time, before any test module imports ``datasets`` or ``transformers`` (both read their offline
flags when first imported).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_ROOT = tempfile.mkdtemp(prefix="kullm-tests-")
_OWNER = os.getpid()  # a forked child (a mutmut mutant) shares the folder with its siblings: only the owner deletes it
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": os.path.join(_ROOT, "hf"),
        # KULLM_TEST_CACHE: a folder kept across sessions for the built tiny models (their folders are named by a
        # hash of what they are built from); a mutation run sets it, or every mutant would build them anew
        "KULLM_CACHE": os.environ.get("KULLM_TEST_CACHE") or os.path.join(_ROOT, "kullm"),
        "WANDB_MODE": "disabled",
        "WANDB_DIR": os.path.join(_ROOT, "wandb"),
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("WANDB_API_KEY", None)


def pytest_sessionfinish(session, exitstatus):
    if os.getpid() == _OWNER:
        shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on a random tiny model (``helpers.make_adapter``), made once per session. Tests only read it;
    a test that changes an adapter changes a copy of it."""
    from helpers import make_adapter  # not at the top: the settings above must come before torch and transformers

    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter")
