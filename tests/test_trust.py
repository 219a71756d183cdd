"""A shared adapter or run folder is data, never code or permissions: tried as an attacker would."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_generate import make_adapter

from kullm.adapter import AdapterError, load_adapter

TRAP_CODE = """
from pathlib import Path
Path(__file__).with_name("PWNED").write_text("the model's own code ran")
from transformers import PretrainedConfig
class TrapConfig(PretrainedConfig):
    model_type = "trap"
"""


@pytest.fixture(scope="module")
def trapped(tmp_path_factory) -> tuple[Path, Path]:
    """An adapter whose kullm_config.yaml turns on trust_remote_code and points at a base with an ``auto_map``."""
    root = tmp_path_factory.mktemp("trap")
    adapter = make_adapter(root / "adapter")
    base = root / "base"
    base.mkdir()
    (base / "trap.py").write_text(TRAP_CODE, encoding="utf-8")
    config = {"model_type": "trap", "auto_map": {"AutoConfig": "trap.TrapConfig", "AutoModelForCausalLM": "trap.X"}}
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    cfg_path = adapter / "kullm_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    cfg["model"].update(trust_remote_code=True, name_or_path=str(base), tiny_shape=None)
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return adapter, base / "PWNED"


def test_an_adapter_cannot_switch_on_remote_code(trapped):
    adapter, marker = trapped
    with pytest.raises(AdapterError, match="never takes that from a shared folder"):
        load_adapter(adapter)
    assert not marker.exists()


def test_without_the_flag_a_base_with_custom_code_does_not_run_it(trapped, tmp_path):
    adapter, marker = trapped
    plain = tmp_path / "adapter"
    shutil.copytree(adapter, plain)
    cfg = yaml.safe_load((plain / "kullm_config.yaml").read_text(encoding="utf-8"))
    cfg["model"]["trust_remote_code"] = False
    (plain / "kullm_config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    with pytest.raises(Exception):  # noqa: B017 - transformers refuses the auto_map; which error is its own
        load_adapter(plain)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "args", "prog"),
    [
        ("generate", ["prompt=안녕"], "kullm-generate"),
        ("merge", ["out={tmp}/merged"], "kullm-merge"),
        ("evaluate", ["eval_set={tmp}/eval.jsonl", "output_dir={tmp}/eval"], "kullm-eval"),
    ],
)
def test_every_cli_refuses_the_booby_trapped_adapter(trapped, tmp_path, module, args, prog):
    adapter, marker = trapped
    (tmp_path / "eval.jsonl").write_text('{"id": "a", "instruction": "질문", "output": "답"}\n', encoding="utf-8")
    cmd = [sys.executable, "-m", f"kullm.{module}", f"adapter={adapter}", *(a.format(tmp=tmp_path) for a in args)]
    if module != "evaluate":
        cmd.append(f"hydra.run.dir={tmp_path}/run")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{prog}: " in proc.stderr and "never takes that from a shared folder" in proc.stderr
    assert not marker.exists()
