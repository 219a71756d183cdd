"""The adapter folder format: what verify_adapter accepts and refuses."""

import json

import pytest
import torch
from safetensors.torch import save_file

from kullm.adapter import WEIGHTS_FILE, AdapterError, verify_adapter


def folder(tmp_path, tensors):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    if tensors is not None:
        save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    return tmp_path


def test_a_real_adapter_is_accepted_with_its_parameter_count(tmp_path):
    a = {"x.lora_A.weight": torch.zeros(8, 16), "x.lora_B.weight": torch.zeros(16, 8)}
    assert verify_adapter(folder(tmp_path, a)) == 256


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "holds no adapter weights"),
        ({"x.lora_A.weight": torch.zeros(0, 16)}, "holds no adapter weights"),
        (None, f"no {WEIGHTS_FILE}: not an adapter folder"),
    ],
)
def test_an_empty_or_missing_adapter_is_refused(tmp_path, tensors, message):
    with pytest.raises(AdapterError, match=message):
        verify_adapter(folder(tmp_path, tensors))
