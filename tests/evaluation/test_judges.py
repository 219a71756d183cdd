"""The ``openai`` judge against a real local HTTP server through every fault; the ``hf`` judge on the tiny model."""

import asyncio
import logging
import math
import time

import pytest
from chat_server import ChatServer, default_scores, reply_text, script

from kullm.config import compose
from kullm.data.records import Record
from kullm.evaluation.geval import JudgePrompt
from kullm.evaluation.judges import JudgeError, OpenAIJudge, build_judge, retry_after
from kullm.evaluation.pipeline import judge_one

MESSAGES = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Response:\nK\n\n\nResult\n"}]


def judge_cfg(url: str, **kw) -> dict:
    return {
        "name": "openai",
        "base_url": url,
        "model": "judge-1",
        "api_key_env": "KULLM_TEST_KEY",
        "timeout": 2.0,
        "max_retries": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "concurrency": 4,
        **kw,
    }


def ask(cfg: dict, messages=MESSAGES):
    async def go():
        judge = OpenAIJudge(cfg)
        try:
            return await judge.reply(messages)
        finally:
            await judge.aclose()

    return asyncio.run(go())


def test_normal_reply_sends_key_and_temperature_zero(monkeypatch, caplog):
    monkeypatch.setenv("KULLM_TEST_KEY", "sk-secret-123")
    caplog.set_level(logging.DEBUG)
    with ChatServer() as s:
        r = ask(judge_cfg(s.url))
    assert r.text == reply_text(default_scores("K"))
    assert r.attempts == 1 and r.tokens is None and s.counts["K"] == 1
    body = s.requests[0]
    assert body["model"] == "judge-1" and body["temperature"] == 0.0 and "logprobs" not in body
    assert body["messages"] == MESSAGES
    assert s.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text


@pytest.mark.parametrize("fault", ["500", "503", "truncated", "badjson", "drop", "429"])
def test_transient_fault_is_retried(fault):
    with ChatServer(faults=script({"K": [fault, fault]})) as s:
        r = ask(judge_cfg(s.url))
    assert r.attempts == 3 and s.counts["K"] == 3
    assert s.served[fault] == 2 and s.served["ok"] == 1
    assert r.text == reply_text(default_scores("K"))


@pytest.mark.parametrize("fault", ["deep", "surrogate"])
def test_a_body_too_deep_to_decode_or_holding_a_lone_surrogate_is_an_invalid_reply_asked_again(fault):
    with ChatServer(faults=script({"K": [fault]})) as s:
        r = ask(judge_cfg(s.url))
    assert r.attempts == 2 and s.served[fault] == 1
    assert r.text == reply_text(default_scores("K"))
    with ChatServer(faults=lambda key, n: fault) as s, pytest.raises(JudgeError, match="invalid response body"):
        ask(judge_cfg(s.url, max_retries=1))


def test_retry_after_is_honoured():
    with ChatServer(faults=script({"K": ["429"]}), retry_after="1") as s:
        t = time.monotonic()
        r = ask(judge_cfg(s.url))  # own backoff would be ~0.01 s
        elapsed = time.monotonic() - t
    assert r.attempts == 2 and 1.0 <= elapsed < 1.8


def test_retry_after_header_forms():
    assert retry_after("2.5") == 2.5
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= retry_after(future) <= 30


def test_slow_response_times_out_and_is_retried():
    with ChatServer(faults=script({"K": ["slow"]}), slow_s=6.0) as s:
        t = time.monotonic()
        r = ask(judge_cfg(s.url, timeout=1.0))  # wide of an honest reply on a loaded box
        elapsed = time.monotonic() - t
    assert r.attempts == 2 and s.counts["K"] == 2 and elapsed < 4.0  # not the 6 s the slow reply would take


def test_retries_are_bounded():
    with ChatServer(faults=lambda key, n: "500") as s:
        with pytest.raises(JudgeError, match="gave up after 3 attempts; last error: HTTP 500") as e:
            ask(judge_cfg(s.url, max_retries=2))
    assert e.value.attempts == 3 and not e.value.fatal and s.counts["K"] == 3


def test_bad_key_is_fatal_without_retries():
    with ChatServer(faults=lambda key, n: "401") as s:
        with pytest.raises(JudgeError, match=r"HTTP 401 .*\$KULLM_TEST_KEY") as e:
            ask(judge_cfg(s.url))
    assert e.value.fatal and s.counts["K"] == 1


def test_connection_refused_is_retried_then_reported():
    with ChatServer() as s:
        url = s.url
    with pytest.raises(JudgeError, match="ConnectError"):
        ask(judge_cfg(url, max_retries=1))


def test_concurrency_limit():
    msgs = [[MESSAGES[0], {"role": "user", "content": f"Response:\n{k}\n\n\nResult\n"}] for k in range(8)]

    async def go(url):
        judge = OpenAIJudge(judge_cfg(url, concurrency=2))
        try:
            return await asyncio.gather(*(judge.reply(m) for m in msgs))
        finally:
            await judge.aclose()

    with ChatServer(delay_s=0.15) as s:
        replies = asyncio.run(go(s.url))
    assert len(replies) == 8 and s.max_in_flight == 2 and sum(s.counts.values()) == 8


@pytest.fixture(scope="module")
def prompt() -> JudgePrompt:
    return JudgePrompt.from_config(compose("eval", ["output_dir=/tmp/unused"]).judge_prompt)


def run_one(cfg: dict, prompt: JudgePrompt, response: str, retries: int = 2):
    async def go():
        judge = OpenAIJudge(cfg)
        try:
            return await judge_one(judge, prompt, Record("r1", "지시", "", response), retries)
        finally:
            await judge.aclose()

    return asyncio.run(go())[1]


def test_logprobs_give_weighted_scores(prompt):
    probs = {" 1": 0.5, " 0": 0.25, " 2": 0.125, " 점": 0.125}  # " 2" is outside 0-1 and 1-3 tolerates it

    with ChatServer(scores=lambda k: {c.name: int(c.max) for c in prompt.criteria}, probs=lambda *a: probs) as s:
        j = run_one(judge_cfg(s.url, logprobs=True, top_logprobs=5), prompt, "A")
    assert s.requests[0]["logprobs"] is True and s.requests[0]["top_logprobs"] == 5
    assert j["status"] == "ok" and j["scores"]["전반적인 품질"] == 5
    assert j["weighted"]["이해 가능성"] == pytest.approx(0.5 / 0.75)  # values 0 and 1
    assert j["weighted"]["자연스러움"] == pytest.approx((0.5 + 2 * 0.125) / 0.625)  # values 1 and 2 offered
    assert j["weighted"]["전반적인 품질"] == pytest.approx((0.5 + 0.25) / 0.625)


def test_unparseable_replies_are_reasked_then_recorded(prompt):
    with ChatServer(faults=script({"A": ["garbage", "outofrange"]})) as s:
        j = run_one(judge_cfg(s.url), prompt, "A", retries=2)
        assert j["status"] == "ok" and j["attempts"] == 3 and s.counts["A"] == 3
        missing = "; ".join(f"{c.name}: missing" for c in prompt.criteria)
        assert j["parse_errors"] == [missing, "이해 가능성: 7 outside 0-1"]
        j = run_one(judge_cfg(s.url), prompt, "B", retries=0)
        assert j["status"] == "ok" and s.counts["B"] == 1
    with ChatServer(faults=lambda k, n: "garbage") as s:
        j = run_one(judge_cfg(s.url), prompt, "C", retries=1)
    assert j["status"] == "failed" and j["scores"] is None and j["attempts"] == 2 and s.counts["C"] == 2
    assert j["raw"] == "I cannot evaluate this response." and j["error"].startswith("이해 가능성: missing")


def test_hf_judge_weighted_scores_equal_a_hand_computation(prompt):
    import torch

    cfg = compose("eval", ["output_dir=/tmp/unused", "judge=hf"]).judge
    judge = build_judge(cfg, prompt)
    msgs = prompt.messages("한국의 수도는?", "", "서울입니다.")
    reply = asyncio.run(judge.reply(msgs))

    # one forward pass over the whole context + reply; read each score token's distribution from the logits
    tok, lm = judge.tokenizer, judge.lm
    text = judge.context(msgs) + reply.text
    enc = tok(text, return_offsets_mapping=True)
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
    lines = reply.text.splitlines()
    assert len(lines) == len(prompt.criteria)
    offset = len(judge.context(msgs))
    for line, c in zip(lines, prompt.criteria, strict=True):
        head = f"- {c.name} ({int(c.min)} - {int(c.max)}): "
        assert line.startswith(head)
        chosen = int(line[len(head) :])
        pos = offset + len(head)  # the digit's character
        t = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= pos < b)
        piece = tok.convert_ids_to_tokens(enc["input_ids"][t])
        assert piece.endswith(str(chosen))
        alt = {v: tok.convert_tokens_to_ids(piece[:-1] + str(v)) for v in c.values}
        row = logits[t - 1]
        z = sum(math.exp(float(row[i])) for i in alt.values())
        expected = sum(v * math.exp(float(row[i])) / z for v, i in alt.items())
        assert reply.weighted[c.name] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert chosen == max(alt, key=lambda v: float(row[alt[v]]))  # greedy among the allowed values
        offset += len(line) + 1
    j = asyncio.run(judge_one(judge, prompt, Record("x", "한국의 수도는?", "", "서울입니다."), 0))[1]
    assert j["status"] == "ok" and j["weighted"] == reply.weighted and j["model"] == "kullm:tiny"


def test_a_reply_trickled_a_byte_at_a_time_hits_the_deadline():
    """httpx's timeout is per read: a byte every 50 ms never trips it. judge.timeout is a deadline per request."""
    with ChatServer(faults=script({"K": ["drip"]})) as s:
        t = time.monotonic()
        r = ask(judge_cfg(s.url, timeout=1.0))
        elapsed = time.monotonic() - t
    assert r.attempts == 2 and s.served["drip"] == 1 and 1.0 <= elapsed < 2.5


def test_an_oversized_body_is_refused():
    with ChatServer(faults=lambda key, n: "huge") as s:
        with pytest.raises(JudgeError, match="over judge.max_response_bytes=1048576"):
            ask(judge_cfg(s.url, max_retries=0, max_response_bytes=1 << 20))


@pytest.mark.parametrize("bad", [{"concurrency": 0}, {"concurrency": -1}, {"timeout": 0}])
def test_settings_that_would_hang_are_refused(bad):
    with pytest.raises(ValueError, match="must be positive"):
        OpenAIJudge(judge_cfg("http://127.0.0.1:9/v1", **bad))


def test_a_server_echoing_the_key_never_gets_it_stored(monkeypatch, prompt):
    monkeypatch.setenv("KULLM_TEST_KEY", "sk-echoed-456")
    with ChatServer(faults=lambda key, n: "echo400") as s:
        with pytest.raises(JudgeError) as e:
            ask(judge_cfg(s.url, max_retries=0))
    assert "Authorization" in str(e.value) and "sk-echoed-456" not in str(e.value) and "<redacted>" in str(e.value)
    with ChatServer(faults=lambda key, n: "echo") as s:
        r = ask(judge_cfg(s.url))
    assert "(seen: Bearer <redacted>)" in r.text and "sk-echoed-456" not in r.text
