"""Translation backends: DeepL's REST API and any OpenAI-compatible chat endpoint, behind one small interface.

Both reuse the judge's HTTP client (:class:`kullm.evaluation.judges.JsonClient`): a whole-request deadline, bounded
concurrency, retries with backoff honouring ``Retry-After``, a body size limit, and the API key (read from the env
var the config names) scrubbed from every message. :func:`translate_many` is the one loop over many texts: cache
hits are never sent, duplicates go once, misses go in batches written to the cache as each one finishes, and a fatal
error (DeepL's 456 quota, a refused key) stops the sending cleanly with everything done kept.

Protected spans travel as ``<x id="N"/>`` tags (:data:`MASK_TAG`): DeepL gets them with ``tag_handling=xml`` (the
rest of the text XML-escaped here), an OpenAI-compatible model is told to copy them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kullm.config import defaults
from kullm.data.conversations import unencodable
from kullm.errors import KullmError
from kullm.evaluation.judges import JsonClient, completions_url

log = logging.getLogger(__name__)

MASK_TAG = re.compile(r'<x id="\d+"/>')  # a protected span's placeholder, as the pipeline writes it
DEEPL_FREE, DEEPL_PRO = "https://api-free.deepl.com", "https://api.deepl.com"
_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
# The backend.* knobs users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {
    "backend.name": ("deepl", "openai"),
    "backend.concurrency": int,
    "backend.batch_size": int,
    "backend.max_retries": int,
    "backend.timeout": float,
}
MINIMUM: dict[str, float] = {
    "backend.concurrency": 1,
    "backend.batch_size": 1,
    "backend.max_retries": 0,
    "backend.timeout": 0.001,
}


class TranslateError(KullmError, RuntimeError):
    """A request that failed for good (retries exhausted, or an error retrying cannot fix)."""

    def __init__(self, message: str, attempts: int = 1, fatal: bool = False) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.fatal = fatal  # True: every further request would fail the same way (bad key, bad URL, quota)


class QuotaExceeded(TranslateError):
    """DeepL's 456: the account's character quota (or cost limit) is spent; nothing more can be sent."""

    def __init__(self, message: str, attempts: int = 1, fatal: bool = True) -> None:
        super().__init__(message, attempts, fatal=True)


class Backend(Protocol):
    name: str
    model: str
    identity: str  # canonical JSON of the name, model and every option that changes the output: the cache key's
    batch_size: int
    concurrency: int
    requests: int  # HTTP requests made so far (retries included)

    async def translate(self, texts: Sequence[str]) -> list[str]: ...

    def batches(self, texts: Sequence[str]) -> list[list[str]]: ...

    def estimate(self, texts: Sequence[str]) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def build_backend(cfg: Mapping[str, Any]) -> Backend:
    """The backend of a ``backend=`` config node (a partial node takes the rest from ``conf/backend/<name>.yaml``)."""
    kind = cfg["name"]
    if kind == "deepl":
        return DeepLBackend(cfg)
    if kind == "openai":
        return OpenAIBackend(cfg)
    raise ValueError(f"backend.name must be 'deepl' or 'openai', got {kind!r}")


class _Paced:
    """What both backends share: the HTTP client, a start-rate limit, request counting, batching by size."""

    name: str
    batch_size: int
    max_batch_chars: int | None = None

    def _setup(self, cfg: Any, url: str, headers: dict[str, str], key: str | None, env: str) -> None:
        self.http = JsonClient(url, cfg, headers, key, env, error=TranslateError, what="backend")
        self.concurrency = int(cfg.concurrency)
        self.rate_limit = float(cfg.rate_limit) if cfg.rate_limit else None
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"backend.rate_limit must be positive or null, got {cfg.rate_limit}")
        self.requests = 0
        self._next_start = 0.0
        self._pace_lock = asyncio.Lock()

    async def _pace(self) -> None:
        """Wait for this request's start slot: at most ``rate_limit`` starts per second."""
        if self.rate_limit is None:
            return
        async with self._pace_lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.rate_limit
        if start > now:
            await asyncio.sleep(start - now)

    def batches(self, texts: Sequence[str]) -> list[list[str]]:
        """``texts`` in order, cut into requests of at most ``batch_size`` texts and ``max_batch_chars`` characters."""
        out: list[list[str]] = []
        size = 0
        for text in texts:
            n = len(text)
            if (
                not out
                or len(out[-1]) >= self.batch_size
                or (self.max_batch_chars is not None and size + n > self.max_batch_chars)
            ):
                out.append([])
                size = 0
            out[-1].append(text)
            size += n
        return out

    async def _call(self, body: dict[str, Any], parse: Any, refuse: Any = None) -> Any:
        await self._pace()
        try:
            result, attempts = await self.http.call(body, parse, refuse)
        except TranslateError as e:
            self.requests += e.attempts
            if str(e).startswith(f"{self.name}: "):
                raise
            raise type(e)(f"{self.name}: {e}", e.attempts, e.fatal) from None  # which backend, in every message
        self.requests += attempts
        return result

    async def aclose(self) -> None:
        await self.http.aclose()


def _key(env: str) -> str | None:
    return os.environ.get(env) or None


def _identity(**fields: Any) -> str:
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _checked(text: Any, source: str) -> str:
    """A reply's text, refused (as a broken body, retried) when it is no string, unencodable, or empty for a
    non-empty source: never a silent empty translation."""
    if not isinstance(text, str):
        raise TypeError(f"a translation is {type(text).__name__}, not a string")
    if (why := unencodable(text)) is not None:
        raise ValueError(f"a translation holds {why}")
    if source.strip() and not text.strip():
        raise ValueError("an empty translation of a non-empty text")
    return text


# --- DeepL ----------------------------------------------------------------------------------------------------


def xml_escape(text: str) -> str:
    """``text`` with ``& < >`` escaped everywhere except in the mask tags, for ``tag_handling=xml``."""
    out, at = [], 0
    for m in MASK_TAG.finditer(text):
        out.append(_escape(text[at : m.start()]) + m.group())
        at = m.end()
    return "".join(out) + _escape(text[at:])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_unescape(text: str) -> str:
    """The inverse of :func:`xml_escape` on what DeepL returns (named and numeric character references, one pass)."""

    def one(m: re.Match) -> str:
        ref = m.group(1)
        if ref.startswith("#x"):
            return chr(int(ref[2:], 16))
        if ref.startswith("#"):
            return chr(int(ref[1:]))
        return _NAMED[ref]

    return _ENTITY.sub(one, text)


class DeepLBackend(_Paced):
    """DeepL's ``POST /v2/translate``: up to ``batch_size`` (≤ 50) texts per request, JSON in and out."""

    name = "deepl"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        cfg = defaults("backend/deepl", cfg)
        env = str(cfg.api_key_env or "DEEPL_AUTH_KEY")
        key = _key(env)
        if cfg.base_url:
            base = str(cfg.base_url)
        elif key:
            base = DEEPL_FREE if key.endswith(":fx") else DEEPL_PRO
        else:
            raise TranslateError(f"deepl: ${env} is not set (DeepL needs an API key)", fatal=True)
        if not key:
            log.warning("$%s is not set: sending requests without an API key (fine for a local server)", env)
        self.batch_size = int(cfg.batch_size)
        if not 1 <= self.batch_size <= 50:
            raise ValueError(f"backend.batch_size must be 1 to 50 for DeepL, got {self.batch_size}")
        self.max_batch_chars = int(cfg.max_batch_chars)
        self.xml = cfg.tag_handling == "xml"
        if cfg.tag_handling not in (None, "xml"):
            raise ValueError(f"backend.tag_handling must be xml or null, got {cfg.tag_handling!r}")
        body: dict[str, Any] = {"target_lang": str(cfg.target_lang)}
        if cfg.source_lang:
            body["source_lang"] = str(cfg.source_lang)
        if cfg.formality and cfg.formality != "default":
            body["formality"] = str(cfg.formality)
        if cfg.glossary_id:
            if not cfg.source_lang:
                raise ValueError("backend.glossary_id needs backend.source_lang (DeepL refuses a glossary without it)")
            body["glossary_id"] = str(cfg.glossary_id)
        if cfg.model_type:
            body["model_type"] = str(cfg.model_type)
        if self.xml:
            body |= {"tag_handling": "xml", "ignore_tags": list(cfg.ignore_tags or [])}
        body["preserve_formatting"] = bool(cfg.preserve_formatting)
        self.body = body | dict(cfg.extra_body or {})
        self.model = str(cfg.model_type or "deepl")
        self.identity = _identity(backend=self.name, model=self.model, **self.body)
        self.price = float(cfg.price_per_million_chars)
        self.chars_per_token = float(cfg.chars_per_token)
        headers = {"Authorization": f"DeepL-Auth-Key {key}"} if key else {}
        self._setup(cfg, base.rstrip("/") + "/v2/translate", headers, key, env)

    async def translate(self, texts: Sequence[str]) -> list[str]:
        """One request for ``texts`` (at most ``batch_size``); the translations in the same order."""
        texts = list(texts)
        if not texts:
            return []
        if len(texts) > self.batch_size:
            raise ValueError(f"{len(texts)} texts in one DeepL request, over backend.batch_size={self.batch_size}")
        sent = [xml_escape(t) for t in texts] if self.xml else texts
        return await self._call({**self.body, "text": sent}, lambda body: self._parse(body, texts), self._refuse)

    def _parse(self, text_body: str, texts: list[str]) -> list[str]:
        try:
            data = json.loads(text_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
        items = data["translations"]
        if not isinstance(items, list):
            raise TypeError(f"'translations' is {type(items).__name__}, not a list")
        if len(items) != len(texts):
            raise ValueError(f"DeepL returned {len(items)} translations for {len(texts)} texts")
        out = []
        for item, source in zip(items, texts, strict=True):
            text = self.http.scrub(_checked(item["text"], source))
            out.append(xml_unescape(text) if self.xml else text)
        return out

    def _refuse(self, status: int, text_body: str) -> Exception | None:
        if status == 456:
            return QuotaExceeded(
                f"deepl: HTTP 456 from {self.http.shown_url}: the DeepL quota is used up (characters or cost limit); "
                "what was translated is kept, run again when the quota allows"
            )
        return None

    def estimate(self, texts: Sequence[str]) -> dict[str, Any]:
        """What sending ``texts`` would cost: DeepL bills source characters."""
        chars = sum(len(t) for t in texts)
        return {
            "characters": chars,
            "tokens": math.ceil(chars / self.chars_per_token),
            "requests": len(self.batches(texts)),
            "cost_usd": round(chars * self.price / 1e6, 6),
        }


# --- OpenAI-compatible chat endpoint --------------------------------------------------------------------------


class OpenAIBackend(_Paced):
    """An OpenAI-compatible ``/chat/completions`` endpoint: one text per request, the prompt from the config."""

    name = "openai"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        cfg = defaults("backend/openai", cfg)
        env = str(cfg.api_key_env or "OPENAI_API_KEY")
        key = _key(env)
        if not key:
            log.warning("$%s is not set: sending requests without an API key (fine for a local server)", env)
        self.model = str(cfg.model)
        self.system_prompt = str(cfg.system_prompt)
        self.user_template = str(cfg.user_template)
        if "{text}" not in self.user_template:
            raise ValueError("backend.user_template must hold {text}")
        self.batch_size = int(cfg.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"backend.batch_size must be at least 1, got {self.batch_size}")
        self.body: dict[str, Any] = {
            "model": self.model,
            "temperature": float(cfg.temperature),
            "max_tokens": int(cfg.max_tokens),
            **dict(cfg.extra_body or {}),
        }
        self.identity = _identity(
            backend=self.name, system_prompt=self.system_prompt, user_template=self.user_template, **self.body
        )
        self.prices = (float(cfg.price_per_million_input_tokens), float(cfg.price_per_million_output_tokens))
        self.chars_per_token = float(cfg.chars_per_token)
        self.output_ratio = float(cfg.output_token_ratio)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._setup(cfg, completions_url(str(cfg.base_url)), headers, key, env)

    def messages(self, text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_template.replace("{text}", text)},
        ]

    async def translate(self, texts: Sequence[str]) -> list[str]:
        """Each text in its own request (run concurrently); the translations in the same order."""
        return list(await asyncio.gather(*(self._one(t) for t in texts)))

    async def _one(self, text: str) -> str:
        return await self._call({**self.body, "messages": self.messages(text)}, lambda body: self._parse(body, text))

    def _parse(self, text_body: str, source: str) -> str:
        try:
            choice = json.loads(text_body)["choices"][0]
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
        if choice.get("finish_reason") == "length":  # retrying gets the same cut reply: an error at once
            raise TranslateError(f"openai: the reply was cut at backend.max_tokens={self.body['max_tokens']}")
        text = self.http.scrub(_checked(choice["message"]["content"], source)).strip()
        # the model's reply trimmed, the source's own surrounding whitespace kept
        lead = source[: len(source) - len(source.lstrip())]
        trail = source[len(source.rstrip()) :]
        return lead + text + trail

    def estimate(self, texts: Sequence[str]) -> dict[str, Any]:
        """What sending ``texts`` would cost: the prompt and text in, about ``output_token_ratio`` times out."""
        chars = sum(len(t) for t in texts)
        tokens = math.ceil(chars / self.chars_per_token)
        overhead = math.ceil(len(self.system_prompt) / self.chars_per_token) + 8  # per request: prompt, roles
        requests = len(self.batches(texts))
        out_tokens = math.ceil(tokens * self.output_ratio)
        cost = ((tokens + overhead * requests) * self.prices[0] + out_tokens * self.prices[1]) / 1e6
        return {"characters": chars, "tokens": tokens, "requests": requests, "cost_usd": round(cost, 6)}


# --- many texts -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What :func:`translate_many` did: the translations (source text → translation, cache hits included), the
    texts that failed and why, the fatal error that stopped the sending (``None`` if none), requests and hits."""

    translations: dict[str, str] = field(default_factory=dict)
    failed: dict[str, TranslateError] = field(default_factory=dict)
    stopped: TranslateError | None = None
    requests: int = 0
    cached: int = 0


async def translate_many(backend: Backend, texts: Iterable[str], cache: Any = None) -> Outcome:
    """Translate ``texts``: each distinct text once, cache hits never sent, misses in ``backend.batches`` run by
    ``concurrency`` workers; each finished batch goes to ``cache`` (a :class:`~kullm.translation.cache.
    TranslationCache`) at once. A fatal error stops new requests; the texts not sent fail with it."""
    unique = list(dict.fromkeys(texts))
    out = Outcome()
    out.translations = {t: t for t in unique if not t.strip()}  # nothing to translate, nothing to pay for
    if cache is not None:
        hits = cache.get_many([t for t in unique if t not in out.translations])
        out.translations |= hits
        out.cached = len(hits)
    queue = backend.batches([t for t in unique if t not in out.translations])
    queue.reverse()  # popped from the end: in order
    before = backend.requests

    async def worker() -> None:
        while queue and out.stopped is None:
            batch = queue.pop()
            try:
                result = await backend.translate(batch)
            except TranslateError as e:
                if e.fatal and out.stopped is None:
                    out.stopped = e
                out.failed |= dict.fromkeys(batch, e)
                continue
            pairs = list(zip(batch, result, strict=True))
            if cache is not None:
                cache.put_many(pairs)
            out.translations |= pairs

    await asyncio.gather(*(worker() for _ in range(min(getattr(backend, "concurrency", 1), len(queue)) or 1)))
    if out.stopped is not None:  # the batches never sent
        for batch in queue:
            out.failed |= dict.fromkeys(batch, out.stopped)
    out.requests = backend.requests - before
    return out
