"""``redact`` hides credentials and nothing else."""

import pytest
from omegaconf import OmegaConf

from kullm.redaction import is_secret_key, redact

SECRETS = ["api_key", "OPENAI_API_KEY", "apikey", "hf_token", "token", "auth_token", "access_token", "password",
           "hub-password", "passwd", "secret", "client_secret", "authorization", "access_key", "key",
           "credentials"]  # fmt: skip
KEPT = ["tokenizer", "token_budget", "max_new_tokens", "max_tokens", "tokens", "trained_tokens", "eos_token",
        "pad_token", "bos_token", "unk_token", "additional_special_token", "tokens_per_s", "keys", "monitor",
        "chunk_size", "name_or_path", "add_eos"]  # fmt: skip


@pytest.mark.parametrize("key", SECRETS)
def test_credentials_are_hidden(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", KEPT)
def test_other_keys_are_kept(key):
    assert not is_secret_key(key)


def test_redact_walks_nested_config_and_keeps_structure():
    cfg = OmegaConf.create(
        {
            "model": {"tokenizer": "tok/path", "eos_token": "<|endoftext|>", "pad_token": None},
            "data": {"token_budget": 4096, "cutoff_len": 512},
            "hub": {"hf_token": "hf_abc", "password": "pw"},
            "judge": {"api_key": "sk-1", "headers": [{"authorization": "Bearer x"}], "max_tokens": 64},
        }
    )
    out = redact(cfg)
    assert out["model"] == {"tokenizer": "tok/path", "eos_token": "<|endoftext|>", "pad_token": None}
    assert out["data"] == {"token_budget": 4096, "cutoff_len": 512}
    assert out["hub"] == {"hf_token": "<redacted>", "password": "<redacted>"}
    assert out["judge"] == {"api_key": "<redacted>", "headers": [{"authorization": "<redacted>"}], "max_tokens": 64}
    assert "sk-1" not in str(out) and "hf_abc" not in str(out)


def test_redact_resolves_interpolations_and_takes_plain_dicts():
    cfg = OmegaConf.create({"root": "/data", "path": "${root}/x.jsonl", "hub": {"hf-token": "hf_x"}})
    assert redact(cfg) == {"root": "/data", "path": "/data/x.jsonl", "hub": {"hf-token": "<redacted>"}}
    assert redact({"api_key": "k", "n": 1}) == {"api_key": "<redacted>", "n": 1}


def test_secret_values_scrub_and_command_lines():
    from kullm.redaction import redact_args, scrub, secret_values

    cfg = OmegaConf.create({"hub": {"hf_token": "hf_abc", "eos_token": "</s>"}, "judge": {"api_key": ""}})
    args = ["+hub.password=pw1", "~judge.secret=s2", "lr=0.1", "prompt=hello"]
    assert secret_values(cfg, args) == {"hf_abc", "pw1", "s2"}
    assert scrub("token hf_abc, pass pw1 and pw12", {"pw1", "pw12", "hf_abc"}) == (
        "token <redacted>, pass <redacted> and <redacted>"
    )
    assert redact_args(["+hub.hf_token='hf_abc'", "lr=0.1"]) == ["+hub.hf_token='<redacted>'", "lr=0.1"]


def test_url_credentials_are_hidden_by_shape_whatever_key_holds_them():
    from kullm.redaction import scrub, scrub_urls

    url = "https://me:pw9@judge.example/v1?api-key=k1&api-version=2024-06-01&sig=s2&access_token=t3"
    assert scrub_urls(url) == (
        "https://<redacted>@judge.example/v1?api-key=<redacted>&api-version=2024-06-01&sig=<redacted>"
        "&access_token=<redacted>"
    )
    assert scrub_urls("git clone https://ghp_tok@github.com/x/y and http://host/a?b=c") == (
        "git clone https://<redacted>@github.com/x/y and http://host/a?b=c"
    )
    assert redact({"judge": {"base_url": url, "max_tokens": 64}})["judge"]["base_url"] == scrub_urls(url)
    assert scrub(f"- judge.base_url='{url}'", set()) == f"- judge.base_url='{scrub_urls(url)}'"


def test_a_run_log_line_is_scrubbed_of_url_credentials_and_secret_values():
    import io
    import logging

    from kullm.redaction import ScrubLog

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubLog({"hf_abc"}))
    logger = logging.getLogger("kullm.test_redact")
    logger.addHandler(handler)
    try:
        logger.warning("POST %s with %s", "http://u:pw@h/v1?api-key=k&n=2", "hf_abc")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "POST http://<redacted>@h/v1?api-key=<redacted>&n=2 with <redacted>\n"
