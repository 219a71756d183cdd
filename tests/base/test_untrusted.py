"""A shared folder's YAML and chat template are untrusted input: read as plain data and rendered within bounds,
each refusal one line naming the file and what is wrong."""

import json
import time

import pytest
from console_scripts import run_script
from helpers import make_adapter

from kullm.chat_template import to_chat_template
from kullm.config import compose
from kullm.modeling import load_tokenizer
from kullm.templates import Prompter
from kullm.tiny import FAMILIES
from kullm.untrusted import TemplateBoundError, UntrustedFileError, read_yaml, render_chat

CHAT = [
    {"role": "system", "content": "너는 도우미야"},
    {"role": "user", "content": "안녕 {{ x }}"},
    {"role": "assistant", "content": "반가워"},
    {"role": "user", "content": "다음"},
]
# what templates on the hub use beyond kullm's: tojson, loop controls, namespaces, format, {% generation %}
FEATURES = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {%- if loop.index > 3 %}{% break %}{% endif -%}
  {% set ns.n = ns.n + 1 %}
  {{ m | tojson }} {{ '%-5s|' | format(m.role) }} {{ "{:>4}".format(loop.index) }}
  {% generation %}{{ m.content | upper }}{% endgeneration %}
{% endfor %}
{{ ns.n }} {{ eos_token }} {{ 2 ** 10 }} {{ 'ab' * 3 }} {{ [1, 2] + [3] }}
{% if add_generation_prompt %}GEN{% endif %}"""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(compose("prepare", ["output_dir=/tmp/unused"]).model)


def outcome(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the same error, or the same text, is what is compared
        return type(e).__name__


@pytest.mark.parametrize("name", ["kullm", "features", *FAMILIES])
def test_the_bounded_renderer_renders_exactly_what_transformers_renders(tok, name):
    kullm = to_chat_template(Prompter.from_config(compose("prepare", ["output_dir=/tmp/unused"]).template))
    tok.chat_template = {"kullm": kullm, "features": FEATURES}.get(name) or FAMILIES[name]["chat_template"]
    for messages in (CHAT[1:2], CHAT[:3], CHAT[1:], CHAT):
        for gen in (True, False):
            want = outcome(lambda: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))  # noqa: B023
            assert outcome(lambda: render_chat(tok, messages, gen)) == want  # noqa: B023


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
BOMBS = {
    "nested range loops": (LOOPS, "ran over 1000000 steps (a loop without bound?)"),
    "nested literal loops": ("{% for a in [0,1,2,3,4,5,6,7,8,9] %}" * 10 + "{% endfor %}" * 10,
                             "ran over 1000000 steps (a loop without bound?)"),
    "repetition": ("{{ 'x' * 10000000000 }}", "makes a value over 4194304 characters, items or in size"),
    "power": ("{{ 10 ** 10 ** 10 }}", "makes a value over 4194304 characters, items or in size"),
    "filter width": ("{{ 'x' | center(10000000000) }}", "makes a value over 4194304 characters, items or in size"),
    "method width": ("{{ 'x'.ljust(10000000000) }}", "makes a value over 4194304 characters, items or in size"),
    "doubling": ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}", "makes a value over 4194304 characters, items or in size"),
    "printf width": ("{{ '%0999999999999d' | format(1) }}", "a format width of a million or more"),
    "format width": ("{{ '{:>999999999999}'.format(1) }}", "a format width of a million or more"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "renders over 4194304 characters"),
}  # fmt: skip


@pytest.mark.parametrize("name", BOMBS)
def test_a_template_past_a_bound_is_refused_in_one_line_within_seconds(tok, name):
    source, why = BOMBS[name]
    tok.chat_template = source
    start = time.monotonic()
    with pytest.raises(TemplateBoundError) as e:
        render_chat(tok, CHAT[1:2])
    assert time.monotonic() - start < 10
    assert str(e.value) == (
        f"{tok.name_or_path}: chat_template: {why}: refused (a bound on templates from shared folders)"
    )


def test_a_recursing_macro_is_refused(tok):
    tok.chat_template = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(TemplateBoundError, match="chat_template: nests or recurses too deeply: refused"):
        render_chat(tok, CHAT[1:2])


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("a: &a [x, x]\nb: [*a, *a]\n", "line 2: an alias (*a): kullm's files have none, and aliases can expand"),
        ("model: {name: '${oc.env:HOME}'}\n", "model.name: '${oc.env:HOME}' is an interpolation"),
        ("a:\n  - {b: 'x ${y}'}\n", "a[0].b: 'x ${y}' is an interpolation"),
        ("[" * 5000, "nested too deeply to be a kullm file"),
        ("a: 1\n" * 300_000, "more than the 1048576 a kullm file holds: refused"),
        ("a: [1\n", "line 2: expected ',' or ']'"),
    ],
)
def test_a_shared_yaml_file_is_refused_naming_file_and_reason(tmp_path, text, why):
    path = tmp_path / "kullm_config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UntrustedFileError) as e:
        read_yaml(path)
    assert str(e.value).startswith(f"{path}: ") and why in str(e.value)


def test_a_shared_yaml_file_is_plain_data_as_omegaconf_reads_it(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("lr: 1e-5\nwd: 1.0e-02\nn: 3\nname: 'x {instruction}'\nnone: null\n", encoding="utf-8")
    assert read_yaml(path) == {"lr": 1e-5, "wd": 1e-2, "n": 3, "name": "x {instruction}", "none": None}


def test_generate_refuses_an_adapter_whose_chat_template_loops_without_bound(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "chat_template.jinja").write_text(LOOPS, encoding="utf-8")
    rows = [{"id": "c1", "messages": [{"role": "user", "content": "안녕"}]}, {"id": "i1", "instruction": "안녕"}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    proc = run_script(
        "kullm-generate", f"adapter={adapter}", f"input_file={data}", f"output_file={tmp_path}/out.jsonl",
        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kullm-generate: {adapter}: chat_template: ran over 1000000 steps (a loop without bound?): refused (a bound "
        "on templates from shared folders)"
    )
    assert not (tmp_path / "out.jsonl").exists()
