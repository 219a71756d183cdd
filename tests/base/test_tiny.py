"""The offline tiny models: one folder per thing they are built from, found again instead of rebuilt."""

import os

import pytest

from kullm.config import ConfigError
from kullm.tiny import build_tiny


def test_each_family_has_its_own_folder_and_a_second_call_finds_it():
    neox, llama = build_tiny(), build_tiny(shape={"arch": "llama"})
    assert neox != llama and neox.parent == llama.parent and neox.name.startswith("tiny-")
    before = os.stat(llama / "config.json").st_mtime_ns
    assert build_tiny(shape={"arch": "llama"}) == llama and os.stat(llama / "config.json").st_mtime_ns == before


def test_an_unknown_architecture_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match="must be gpt_neox or one of"):
        build_tiny(tmp_path / "tiny", shape={"arch": "bert"})
    assert list(tmp_path.iterdir()) == []
