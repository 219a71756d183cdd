"""The translation backends against real HTTP servers on 127.0.0.1 speaking DeepL's and OpenAI's protocols, through
every fault: batching, Retry-After, DeepL's 456 quota, 5xx, slow drips, wrong counts, non-JSON, leaked keys."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from chat_server import ChatServer, script
from deepl_server import DeepLServer, fake_korean

from kullm.config import defaults
from kullm.translation.backends import (
    DeepLBackend,
    OpenAIBackend,
    QuotaExceeded,
    TranslateError,
    build_backend,
    translate_many,
    xml_escape,
    xml_unescape,
)
from kullm.translation.cache import TranslationCache

KEY = "sk-deepl-secret-4821:fx"
ENV = "KULLM_TEST_DEEPL_KEY"


@pytest.fixture(autouse=True)
def deepl_key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def deepl_cfg(url: str, **kw) -> dict:
    return {
        "name": "deepl",
        "base_url": url,
        "api_key_env": ENV,
        "timeout": 2.0,
        "max_retries": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "concurrency": 4,
        **kw,
    }


def openai_cfg(url: str, **kw) -> dict:
    return {"model": "ko-mt-1", **deepl_cfg(url, **kw), "name": "openai"}


def translate(cfg: dict, texts: list[str]) -> list[str]:
    async def go():
        backend = build_backend(cfg)
        try:
            return await backend.translate(texts)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def many(cfg: dict, texts: list[str], cache_path=None):
    async def go():
        backend = build_backend(cfg)
        try:
            if cache_path is None:
                return await translate_many(backend, texts)
            with TranslationCache(cache_path, backend.identity) as cache:
                return await translate_many(backend, texts, cache)
        finally:
            await backend.aclose()

    return asyncio.run(go())


TEXTS = [f"Write a short poem number {i} about the sea." for i in range(120)]


def test_deepl_sends_batches_of_50_with_its_protocol():
    with DeepLServer(auth_key=KEY) as s:
        out = many(deepl_cfg(s.url), TEXTS)
    assert out.stopped is None and not out.failed
    assert out.translations == {t: fake_korean(t) for t in TEXTS}
    assert sorted(s.batch_sizes) == [20, 50, 50] and out.requests == 3 and s.paths == ["/v2/translate"] * 3
    assert sorted(s.texts) == sorted(TEXTS)  # each once (batches arrive in any order)
    assert {h["Authorization"] for h in s.headers} == {f"DeepL-Auth-Key {KEY}"}
    body = s.requests[0]
    assert body["target_lang"] == "KO" and body["source_lang"] == "EN" and body["preserve_formatting"] is True
    assert body["tag_handling"] == "xml" and body["ignore_tags"] == ["x"] and "formality" not in body


def test_options_reach_the_request_and_the_identity():
    with DeepLServer() as s:
        translate(deepl_cfg(s.url, formality="prefer_more", glossary_id="g-1", model_type="quality_optimized"), ["Hi"])
    body = s.requests[0]
    assert (body["formality"], body["glossary_id"], body["model_type"]) == ("prefer_more", "g-1", "quality_optimized")
    plain = DeepLBackend(deepl_cfg("http://127.0.0.1:9"))
    ids = {
        plain.identity,
        DeepLBackend(deepl_cfg("http://127.0.0.1:9", formality="prefer_more")).identity,
        DeepLBackend(deepl_cfg("http://127.0.0.1:9", glossary_id="g-1")).identity,
        DeepLBackend(deepl_cfg("http://127.0.0.1:9", target_lang="JA")).identity,
        OpenAIBackend(openai_cfg("http://127.0.0.1:9")).identity,
        OpenAIBackend(openai_cfg("http://127.0.0.1:9", system_prompt="Translate.")).identity,
    }
    assert len(ids) == 6
    # what does not change the output does not change the key: the URL, concurrency, retries
    assert DeepLBackend(deepl_cfg("http://127.0.0.1:8", concurrency=1, max_retries=0)).identity == plain.identity
    assert KEY not in plain.identity


def test_protected_span_tags_and_markup_survive_xml_tag_handling():
    texts = ['If a < b && c > d, call <x id="0"/> with <x id="12"/>.', "Tom & Jerry; 1&2; 3 <= 4", "<</>>&#;&"]
    with DeepLServer() as s:
        out = translate(deepl_cfg(s.url), texts)
    assert s.texts[0] == 'If a &lt; b &amp;&amp; c &gt; d, call <x id="0"/> with <x id="12"/>.'
    for source, got in zip(texts, out, strict=True):
        assert got == xml_unescape(fake_korean(xml_escape(source)))
    assert '<x id="0"/>' in out[0] and '<x id="12"/>' in out[0] and " < " in out[0] and "&&" in out[0]
    assert " & " in out[1] and "1&2; 3 <= 4" in out[1] and out[2] == texts[2]  # the source's own signs kept
    assert xml_unescape("&#44032;&#xAC01;&apos;&quot;&amp;lt;") == "가각'\"&lt;"


def test_retry_after_is_honoured():
    with DeepLServer(faults=script({"A": ["429"]}), retry_after="1") as s:
        t0 = time.perf_counter()
        out = translate(deepl_cfg(s.url, backoff_base=5.0, backoff_max=5.0), ["A", "B"])
        elapsed = time.perf_counter() - t0
    assert out == [fake_korean("A"), fake_korean("B")] and s.counts["A"] == 2
    assert 0.9 <= elapsed < 4.0  # Retry-After (1 s), not the 5 s backoff


def test_quota_456_stops_cleanly_keeping_what_was_done(tmp_path):
    texts = [f"Sentence number {i:03d}." for i in range(50)]  # 21 characters each
    cfg = deepl_cfg("", batch_size=10, concurrency=1)
    with DeepLServer(quota_chars=21 * 20) as s:  # room for two batches of ten
        out = many(cfg | {"base_url": s.url}, texts, tmp_path / "cache.db")
    assert isinstance(out.stopped, QuotaExceeded) and out.stopped.fatal and "456" in str(out.stopped)
    assert "quota" in str(out.stopped) and str(out.stopped).startswith("deepl: ")
    assert list(out.translations) == texts[:20] and set(out.failed) == set(texts[20:])
    assert all(e is out.stopped for e in out.failed.values())
    assert out.requests == 3 and s.served["456"] == 1  # the 456 is not retried, nothing is sent after it
    with DeepLServer() as s2:  # the quota renewed: only what was not done is sent (and paid)
        again = many(cfg | {"base_url": s2.url}, texts, tmp_path / "cache.db")
    assert (
        again.cached == 20
        and sorted(s2.texts) == texts[20:]
        and again.translations == {t: fake_korean(t) for t in texts}
    )


def test_quota_456_with_concurrent_workers_stops_too(tmp_path):
    texts = [f"Row {i:04d}" for i in range(400)]  # 8 characters each
    with DeepLServer(quota_chars=8 * 100, delay_s=0.02) as s:
        out = many(deepl_cfg(s.url, batch_size=10, concurrency=4), texts, tmp_path / "c.db")
    assert isinstance(out.stopped, QuotaExceeded)
    assert len(out.translations) == 100 and len(out.failed) == 300 and s.served["456"] <= 4
    with TranslationCache(tmp_path / "c.db", DeepLBackend(deepl_cfg("http://127.0.0.1:9")).identity) as cache:
        assert len(cache) == 100 and cache.get_many(texts) == out.translations


def test_5xx_is_retried_then_reported():
    with DeepLServer(faults=script({"A": ["500", "503"]})) as s:
        assert translate(deepl_cfg(s.url), ["A"]) == [fake_korean("A")]
    assert s.counts["A"] == 3
    with DeepLServer(faults=lambda key, n: "503") as s:
        with pytest.raises(TranslateError, match=r"^deepl: gave up after 4 attempts; last error: HTTP 503") as e:
            translate(deepl_cfg(s.url), ["A"])
        assert not e.value.fatal and e.value.attempts == 4
        out = many(deepl_cfg(s.url, max_retries=1), ["A", "B"])
    assert out.stopped is None and set(out.failed) == {"A", "B"} and not out.translations


def test_a_slow_drip_hits_the_whole_request_deadline():
    with DeepLServer(faults=lambda key, n: "drip") as s:
        t0 = time.perf_counter()
        with pytest.raises(TranslateError, match=r"no complete reply within 0.5s"):
            translate(deepl_cfg(s.url, timeout=0.5, max_retries=1), ["A long enough text to drip slowly"])
        elapsed = time.perf_counter() - t0
    assert s.counts["A long enough text to drip slowly"] == 2 and elapsed < 3.0


def test_wrong_count_and_non_json_are_named():
    with DeepLServer(faults=lambda key, n: "wrongcount") as s:
        with pytest.raises(TranslateError, match="DeepL returned 2 translations for 3 texts"):
            translate(deepl_cfg(s.url, max_retries=1), ["A", "B", "C"])
    with DeepLServer(faults=lambda key, n: "badjson") as s:
        with pytest.raises(TranslateError, match=r"invalid response body \(ValueError: not JSON"):
            translate(deepl_cfg(s.url, max_retries=0), ["A"])
    with DeepLServer(faults=script({"A": ["wrongcount", "badjson"]})) as s:  # transient: retried
        assert translate(deepl_cfg(s.url), ["A", "B"]) == [fake_korean("A"), fake_korean("B")]


def test_the_key_is_never_in_an_error_a_result_a_log_or_the_cache(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with DeepLServer(auth_key="another-key") as s:
        with pytest.raises(TranslateError, match=rf"HTTP 403 from .*: check \${ENV}") as e:
            translate(deepl_cfg(s.url), ["A"])
    assert e.value.fatal and KEY not in str(e.value)
    with DeepLServer(faults=lambda key, n: "echo") as s:
        out = many(deepl_cfg(s.url), ["A", "B"], tmp_path / "cache.db")
        with ChatServer(faults=lambda key, n: "echo400") as c:
            with pytest.raises(TranslateError) as e2:
                translate(openai_cfg(c.url, max_retries=0), ["A"])
    assert out.translations["A"] == fake_korean("A") + " (seen: DeepL-Auth-Key <redacted>)"
    assert KEY not in str(e2.value) and "<redacted>" in str(e2.value)
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert KEY.encode() not in stored and b"<redacted>" in stored
    assert KEY not in caplog.text


def test_a_second_run_is_served_by_the_cache_with_zero_requests(tmp_path):
    texts = TEXTS[:30] + TEXTS[:5] + [" ", ""]  # duplicates and blank texts are never sent twice / at all
    with DeepLServer() as s:
        first = many(deepl_cfg(s.url, batch_size=8), texts, tmp_path / "cache.db")
        n = sum(s.counts.values())
        second = many(deepl_cfg(s.url, batch_size=8), texts, tmp_path / "cache.db")
        assert sum(s.counts.values()) == n == 4 and sorted(s.texts) == sorted(TEXTS[:30])
    assert first.requests == 4 and second.requests == 0 and second.cached == 30
    assert second.translations == first.translations and first.translations[" "] == " "
    with DeepLServer() as s:  # other options: another cache key, so sent again
        third = many(deepl_cfg(s.url, formality="prefer_less"), texts, tmp_path / "cache.db")
    assert third.cached == 0 and len(s.texts) == 30


def test_concurrency_is_bounded_and_the_rate_limit_paces_starts():
    texts = [f"text {i}" for i in range(12)]
    with DeepLServer(delay_s=0.15) as s:
        out = many(deepl_cfg(s.url, batch_size=1, concurrency=3), texts)
    assert len(out.translations) == 12 and s.max_in_flight == 3
    with DeepLServer() as s:
        t0 = time.perf_counter()
        out = many(deepl_cfg(s.url, batch_size=1, concurrency=8, rate_limit=10.0), texts[:6])
        elapsed = time.perf_counter() - t0
    assert len(out.translations) == 6 and 0.45 <= elapsed < 3.0  # 6 starts at 10/s: the last at 0.5 s


def test_a_rate_limited_server_answers_429_and_everything_still_arrives():
    texts = [f"text {i}" for i in range(40)]
    with DeepLServer(max_concurrent=2, delay_s=0.05, retry_after="0.1") as s:
        out = many(deepl_cfg(s.url, batch_size=2, concurrency=6, max_retries=10), texts)
    assert out.translations == {t: fake_korean(t) for t in texts} and s.served["429"] > 0


def test_deepl_picks_the_free_or_pro_url_and_needs_a_key(monkeypatch):
    assert DeepLBackend({"name": "deepl", "api_key_env": ENV}).http.url == "https://api-free.deepl.com/v2/translate"
    monkeypatch.setenv(ENV, "pro-key")
    assert DeepLBackend({"name": "deepl", "api_key_env": ENV}).http.url == "https://api.deepl.com/v2/translate"
    monkeypatch.delenv(ENV)
    with pytest.raises(TranslateError, match=rf"\${ENV} is not set") as e:
        DeepLBackend({"name": "deepl", "api_key_env": ENV})
    assert e.value.fatal


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"batch_size": 51}, "1 to 50"),
        ({"concurrency": 0}, "must be positive"),
        ({"glossary_id": "g", "source_lang": None}, "needs backend.source_lang"),
        ({"tag_handling": "html"}, "xml or null"),
        ({"name": "google"}, "must be 'deepl' or 'openai'"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        build_backend(deepl_cfg("http://127.0.0.1:9", **bad))


def test_openai_backend_translates_one_text_per_request_with_the_configured_prompt():
    texts = ['  Explain <x id="0"/> in one line.\n', "What is 2 + 2?", 'Explain <x id="0"/> in one line.']
    with ChatServer(reply=fake_korean) as s:
        out = many(openai_cfg(s.url, concurrency=2), texts)
    assert out.requests == 3 and s.max_in_flight <= 2
    # the model's reply trimmed, the source's surrounding whitespace kept; the tag carried through
    assert out.translations[texts[0]] == "  " + fake_korean(texts[0].strip()) + "\n"
    assert '<x id="0"/>' in out.translations[texts[2]]
    body = s.requests[0]
    prompt = defaults("backend/openai").system_prompt
    assert body["model"] == "ko-mt-1" and body["temperature"] == 0.0 and body["messages"][0]["content"] == prompt
    assert "Korean" in prompt and '<x id="N"/>' in prompt and "translation only" in prompt
    assert {m["messages"][1]["content"] for m in s.requests} == set(texts)
    assert s.headers[0]["Authorization"] == f"Bearer {KEY}"


def test_openai_faults_are_retried_or_named():
    with ChatServer(reply=fake_korean, faults=script({"A": ["429", "500", "truncated"]})) as s:
        assert translate(openai_cfg(s.url), ["A"]) == [fake_korean("A")]
    assert s.counts["A"] == 4
    with ChatServer(reply=fake_korean, faults=lambda key, n: "length") as s:
        with pytest.raises(TranslateError, match=r"^openai: the reply was cut at backend.max_tokens=4096"):
            translate(openai_cfg(s.url), ["A"])
    assert s.counts["A"] == 1  # the same cut reply would come back: not retried
    with ChatServer(reply=fake_korean, faults=lambda key, n: "badjson") as s:
        with pytest.raises(TranslateError, match="not JSON"):
            translate(openai_cfg(s.url, max_retries=0), ["A"])
    with ChatServer(reply=lambda key: "   ") as s:  # never a silent empty translation
        with pytest.raises(TranslateError, match="an empty translation of a non-empty text"):
            translate(openai_cfg(s.url, max_retries=0), ["A"])


def test_estimates_count_characters_tokens_requests_and_cost():
    texts = ["a" * 400] * 120
    d = DeepLBackend(deepl_cfg("http://127.0.0.1:9")).estimate(texts)
    assert d == {"characters": 48_000, "tokens": 12_000, "requests": 3, "cost_usd": 1.2}
    o = OpenAIBackend(openai_cfg("http://127.0.0.1:9")).estimate(texts)
    assert o["characters"] == 48_000 and o["tokens"] == 12_000 and o["requests"] == 120
    # 12,000 text tokens + the prompt per request in at $2.5/M, about 24,000 tokens out at $10/M
    assert 0.30 < o["cost_usd"] < 0.33
    free = OpenAIBackend(openai_cfg("http://127.0.0.1:9", price_per_million_input_tokens=0.0,
                                    price_per_million_output_tokens=0.0))  # fmt: skip
    assert free.estimate(texts)["cost_usd"] == 0.0
