"""A shared adapter or run folder is data, never code or permissions: tried as an attacker would."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from console_scripts import run_script
from helpers import make_adapter

from kullm.adapter import AdapterError
from kullm.modeling import load_adapter

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


# --- a shared adapter's files are data, read within bounds, refused in one line ------------------------------------

CLI_ARGS = {"kullm-generate": ["prompt=안녕"], "kullm-merge": ["out={tmp}/merged"]}


@pytest.fixture
def shared(adapter) -> Path:
    """The session's adapter (conftest.py), as a folder someone shared: each test edits a copy of it."""
    return adapter


def refused(prog: str, adapter: Path, tmp_path: Path, env: dict | None = None) -> str:
    """Run ``prog adapter=…`` from outside the checkout; assert it failed in one line and wrote nothing; the line."""
    args = [a.format(tmp=tmp_path) for a in CLI_ARGS[prog]]
    proc = run_script(prog, f"adapter={adapter}", *args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env,
                      timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "merged").exists()
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith(f"{prog}: ")]
    return line


def test_merge_never_resolves_an_interpolation_in_a_shared_adapter_config(shared, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(shared, adapter)
    cfg_path = adapter / "kullm_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    cfg["data"]["missing_hint"] = "${oc.env:OPENAI_API_KEY}"
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    line = refused("kullm-merge", adapter, tmp_path, env={"OPENAI_API_KEY": "sk-PLANTEDkey5151"})
    assert line == (
        f"kullm-merge: {cfg_path}: data.missing_hint: '${{oc.env:OPENAI_API_KEY}}' is an interpolation; a shared "
        "folder's files are read as plain data and never resolved (one could read your environment's secrets): "
        "remove it"
    )
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"sk-PLANTEDkey5151" in p.read_bytes()]


def test_an_alias_bomb_in_a_shared_template_is_refused_at_once(shared, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(shared, adapter)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    (adapter / "template.yaml").write_text("\n".join(bomb) + "\n", encoding="utf-8")
    line = refused("kullm-generate", adapter, tmp_path)
    assert line == (
        f"kullm-generate: {adapter / 'template.yaml'}: line 2: an alias (*a): kullm's files have none, and aliases "
        "can expand without bound"
    )


def lie(path: Path, edit) -> str:
    """Rewrite a safetensors header through ``edit(header)``, which returns the name of the tensor it changed."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    return name


def past_the_end(header: dict) -> str:
    name = min(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    return name


def bigger_shape(header: dict) -> str:
    name = min(k for k in header if k != "__metadata__")
    header[name]["shape"][0] *= 1000
    return name


@pytest.mark.parametrize(
    ("prog", "edit", "why"),
    [
        ("kullm-generate", past_the_end, "data_offsets [0, 1000002048] lie outside the file's 16384 bytes of data"),
        ("kullm-merge", bigger_shape, "shape [8000, 64] (F32) needs 2048000 bytes, data_offsets give 2048"),
    ],
)
def test_a_lying_safetensors_header_is_refused_naming_file_and_tensor(shared, tmp_path, prog, edit, why):
    adapter = tmp_path / "adapter"
    shutil.copytree(shared, adapter)
    weights = adapter / "adapter_model.safetensors"
    name = lie(weights, edit)
    assert refused(prog, adapter, tmp_path) == (
        f"{prog}: {weights}: tensor {name}: {why}: the file's header lies, refusing it"
    )


@pytest.mark.parametrize("prog", ["kullm-generate", "kullm-merge"])
def test_a_tensor_shaped_for_another_base_is_refused_naming_file_and_tensor(shared, tmp_path, prog):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(shared, adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = min(tensors)
    tensors[name] = tensors[name].new_zeros(11, tensors[name].shape[1])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert refused(prog, adapter, tmp_path) == (
        f"{prog}: {weights}: tensor {name} has shape [11, 64] where base model 'kullm:tiny' needs [8, 64]: an "
        "adapter trained on another base model (or with another LoRA rank)"
    )
