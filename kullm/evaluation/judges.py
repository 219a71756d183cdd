"""Judges: something that answers the judge prompt's chat messages with a reply (and, where it can, scores).

* :class:`OpenAIJudge` talks to any OpenAI-compatible ``/chat/completions`` endpoint over HTTP (``httpx``), with
  a concurrency limit, a per-request timeout, and retries with exponential backoff and jitter on 429, 5xx,
  timeouts, connection errors and broken bodies, honouring ``Retry-After``. The API key is read from the env
  var named in the config and is never logged or saved.
* :class:`HFJudge` runs a local causal LM. It writes the prompt's result block itself (teacher forcing
  ``- 이해 가능성 (0 - 1):``) and reads the next-token distribution restricted to the allowed values' tokens,
  so its G-Eval weighted scores are exact: ``sum_v v softmax(logits[t_v])``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from kullm.config import defaults
from kullm.data.conversations import unencodable
from kullm.errors import KullmError
from kullm.evaluation.geval import Criterion, JudgePrompt, TokenLogprobs, softmax_over, weighted_mean
from kullm.redaction import scrub_urls
from kullm.untrusted import render_chat

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# The judge.* knobs users type most (kullm.config.validate collects this table): how many requests in flight, how
# many retries, and the deadline of one request.
SCHEMA: dict[str, Any] = {"judge.concurrency": int, "judge.max_retries": int, "judge.timeout": float}
MINIMUM: dict[str, float] = {"judge.concurrency": 1, "judge.max_retries": 0, "judge.timeout": 0.001}


class JudgeError(KullmError, RuntimeError):
    """A request that failed for good (retries exhausted, or an error retrying cannot fix)."""

    def __init__(self, message: str, attempts: int = 1, fatal: bool = False) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.fatal = fatal  # True: every further request would fail the same way (bad key, bad model name)


@dataclass
class Reply:
    """A judge's reply: its text, per-token logprobs (API judges) or weighted scores (local judges), requests made."""

    text: str
    attempts: int = 1
    tokens: TokenLogprobs | None = None
    weighted: dict[str, float] | None = None


class Judge(Protocol):
    name: str
    model: str

    async def reply(self, messages: list[dict[str, str]]) -> Reply: ...

    async def aclose(self) -> None: ...


def build_judge(cfg: Mapping[str, Any], prompt: JudgePrompt) -> Judge:
    """The judge of a ``judge=`` config node."""
    kind = cfg["name"]
    if kind == "openai":
        return OpenAIJudge(cfg)
    if kind == "hf":
        return HFJudge(cfg, prompt.criteria)
    raise ValueError(f"judge.name must be 'openai' or 'hf', got {kind!r}")


# --- OpenAI-compatible HTTP judge ------------------------------------------------------------------------------


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


T = TypeVar("T")


class JsonClient:
    """POSTs JSON to one URL: the HTTP machinery of :class:`OpenAIJudge`, shared with ``kullm.translation``.

    A whole-request deadline (``cfg.timeout``), at most ``cfg.concurrency`` requests in flight, retries with backoff
    and jitter on 429, 5xx, timeouts, connection errors and broken bodies honouring ``Retry-After``, a body size
    limit; ``secret`` (the key's value) is scrubbed from every message. Errors are ``error`` (a :class:`JudgeError`
    or a class taking the same arguments); ``what`` names the config node in messages (``judge``, ``backend``).
    """

    def __init__(
        self,
        url: str,
        cfg: Mapping[str, Any],
        headers: Mapping[str, str],
        secret: str | None,
        env: str,
        error: type[Exception] = JudgeError,
        what: str = "judge",
    ) -> None:
        self.url, self.shown_url = url, scrub_urls(url)  # what messages name: no user info, no secret query value
        self.timeout = float(cfg["timeout"])  # a deadline for the whole request, not per read
        self.max_bytes = int(cfg["max_response_bytes"])
        concurrency = int(cfg["concurrency"])
        if concurrency < 1 or self.timeout <= 0:
            raise ValueError(f"{what}.concurrency ({concurrency}) and {what}.timeout ({self.timeout}) must be positive")
        self.max_retries = int(cfg["max_retries"])
        self.backoff_base = float(cfg["backoff_base"])
        self.backoff_max = float(cfg["backoff_max"])
        self.retry_after_max = float(cfg["retry_after_max"])
        self.error, self.what, self._env, self._secret = error, what, env, secret or None
        self._sem = asyncio.Semaphore(concurrency)
        self._client = httpx.AsyncClient(
            headers={"Content-Type": "application/json", **headers}, timeout=httpx.Timeout(self.timeout)
        )

    async def call(
        self,
        body: Mapping[str, Any],
        parse: Callable[[str], T],
        refuse: Callable[[int, str], Exception | None] | None = None,
    ) -> tuple[T, int]:
        """POST ``body``; ``parse(text)`` of a 2xx reply (its ValueError/KeyError/... is a broken body, retried) and
        the attempts made. ``refuse(status, text)`` may return an error to raise as it is for a status (DeepL's 456).
        Raises ``self.error`` when out of retries or on an error retrying cannot fix."""
        last = ""
        for attempt in range(1, self.max_retries + 2):
            try:
                async with self._sem:
                    return await self._post(body, parse, refuse), attempt
            except _Retry as r:
                last = r.reason
                if attempt > self.max_retries:
                    break
                wait = self._backoff(attempt) if r.wait is None else min(r.wait, self.retry_after_max)
                log.debug("attempt %d failed (%s); retrying in %.2fs", attempt, r.reason, wait)
                await asyncio.sleep(wait)
            except Exception as e:
                if isinstance(e, self.error):
                    e.attempts = attempt  # type: ignore[attr-defined]
                raise
        raise self.error(f"gave up after {self.max_retries + 1} attempts; last error: {last}", self.max_retries + 1)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def scrub(self, text: str) -> str:
        """``text`` with the API key and URL credentials replaced: a server that echoes the Authorization header or
        the URL must not get them into logs, results or reports."""
        return scrub_urls(text.replace(self._secret, "<redacted>") if self._secret else text)

    async def _post(
        self, body: Mapping[str, Any], parse: Callable[[str], T], refuse: Callable[[int, str], Exception | None] | None
    ) -> T:
        try:
            status, headers, raw = await asyncio.wait_for(self._request(body), self.timeout)
        # a server that trickles its reply hits the deadline
        except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException) as e:
            raise _Retry(f"no complete reply within {self.timeout}s ({type(e).__name__})") from None
        except httpx.TransportError as e:  # connection refused/reset, incomplete (truncated) bodies
            raise _Retry(self.scrub(f"{type(e).__name__}: {e}")) from None
        text_body = self.scrub(raw.decode("utf-8", errors="replace"))
        if refuse is not None and (err := refuse(status, text_body)) is not None:
            raise err
        if status in RETRY_STATUS or status >= 500:
            raise _Retry(f"HTTP {status}", retry_after(headers.get("retry-after")))
        if status in (401, 403):
            raise self.error(f"HTTP {status} from {self.shown_url}: check ${self._env}", fatal=True)
        if status >= 400:
            raise self.error(f"HTTP {status} from {self.shown_url}: {text_body[:300]}", fatal=status == 404)
        try:
            return parse(text_body)
        # RecursionError: a body nested too deeply to decode (e.g. 200,000 '[')
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
            raise _Retry(f"invalid response body ({type(e).__name__}: {e}): {text_body[:80]!r}") from None

    async def _request(self, body: Mapping[str, Any]) -> tuple[int, httpx.Headers, bytes]:
        """POST and read the body, refusing one larger than ``max_response_bytes``."""
        async with self._client.stream("POST", self.url, json=body) as r:
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise _Retry(f"response body over {self.what}.max_response_bytes={self.max_bytes}")
                chunks.append(chunk)
            return r.status_code, r.headers, b"".join(chunks)


class OpenAIJudge:
    """An OpenAI-compatible chat-completions judge (temperature 0; optional ``top_logprobs``).

    ``cfg`` is a ``judge=openai`` node; the keys a partial one leaves out are ``conf/judge/openai.yaml``'s.
    """

    name = "openai"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        cfg = defaults("judge/openai", cfg)
        self.model = str(cfg.model)
        self.body: dict[str, Any] = {
            "model": self.model,
            "temperature": float(cfg.temperature),
            "max_tokens": int(cfg.max_tokens),
            **dict(cfg.extra_body or {}),
        }
        if cfg.logprobs:
            self.body |= {"logprobs": True, "top_logprobs": int(cfg.top_logprobs)}
        env = cfg.api_key_env or "OPENAI_API_KEY"
        key = os.environ.get(env)
        if not key:
            log.warning("$%s is not set: sending requests without an API key (fine for a local server)", env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = JsonClient(completions_url(str(cfg.base_url)), cfg, headers, key, env)
        self.url, self.shown_url, self.timeout = self.http.url, self.http.shown_url, self.http.timeout

    async def reply(self, messages: list[dict[str, str]]) -> Reply:
        """POST the messages, retrying transient failures; raise :class:`JudgeError` when out of retries."""
        (text, tokens), attempts = await self.http.call({**self.body, "messages": messages}, self._parse)
        return Reply(text, attempts=attempts, tokens=tokens)

    async def aclose(self) -> None:
        await self.http.aclose()

    def scrub(self, text: str) -> str:
        """``text`` with the API key and URL credentials replaced (see :meth:`JsonClient.scrub`)."""
        return self.http.scrub(text)

    def _parse(self, text_body: str) -> tuple[str, TokenLogprobs | None]:
        choice = json.loads(text_body)["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
        if (why := unencodable(text)) is not None:
            raise ValueError(f"content holds {why}")
        return self.scrub(text), _tokens(choice.get("logprobs"))


def completions_url(base: str) -> str:
    """``<base>/chat/completions``, a query string of the base (``?api-version=…``) kept after the path."""
    parts = urlsplit(base.strip())
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _tokens(logprobs: Any) -> TokenLogprobs | None:
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    out = []
    for t in logprobs["content"]:
        alts = [(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []]
        out.append((t["token"], alts or [(t["token"], float(t["logprob"]))]))
    return out


# --- local transformers judge ---------------------------------------------------------------------------------


class HFJudge:
    """A local causal LM judge; replies in the prompt's result format with greedy (argmax) allowed values."""

    name = "hf"

    def __init__(self, cfg: Mapping[str, Any], criteria: Sequence[Criterion]) -> None:
        from kullm.modeling import load_model, load_tokenizer

        cfg = defaults("judge/hf", cfg)
        model_cfg = dict(cfg.model)
        self.model = str(model_cfg["name_or_path"])
        self.criteria = list(criteria)
        self.tokenizer = load_tokenizer(model_cfg)
        self.lm = load_model(model_cfg).to(cfg.device or "cpu").eval()
        self._lock = asyncio.Lock()

    async def reply(self, messages: list[dict[str, str]]) -> Reply:
        async with self._lock:  # one forward at a time: the model is not re-entrant across threads
            return await asyncio.to_thread(self.score, messages)

    async def aclose(self) -> None:
        return None

    def context(self, messages: list[dict[str, str]]) -> str:
        """The text the reply continues: the chat template if the tokenizer has one, else system + user."""
        if getattr(self.tokenizer, "chat_template", None):
            return render_chat(self.tokenizer, messages)  # the judge's template, bounded (kullm.untrusted)
        return "\n\n".join(m["content"] for m in messages) + "\n"

    def score(self, messages: list[dict[str, str]]) -> Reply:
        """Write ``- <name> (<min> - <max>): <v>`` per criterion, v the argmax of the allowed values."""
        ctx = self.context(messages)
        reply, weighted = "", {}
        for c in self.criteria:
            head = f"- {c.name} ({_num(c.min)} - {_num(c.max)}):"
            sep, ids = self.value_tokens(ctx + reply + head, c.values)
            probs = softmax_over(self.next_logits(ctx + reply + head + sep, ids))
            weighted[c.name] = weighted_mean(probs)
            best = max(probs, key=probs.get)
            reply += f"{head}{sep if sep else ' '}{best}\n"
        return Reply(reply, attempts=1, weighted=weighted)

    def encode(self, text: str) -> list[int]:
        add = not getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer(text, add_special_tokens=add)["input_ids"]

    def value_tokens(self, prefix: str, values: Sequence[int]) -> tuple[str, dict[int, int]]:
        """How the allowed values continue ``prefix`` as one token each: the separator left in the prefix
        (``" "`` or ``""``) and each value's token id. Checked by tokenising, so BPE merges cannot shift it."""
        for sep, spell in ((" ", "{}"), ("", " {}")):
            base = self.encode(prefix + sep)
            ids = {}
            for v in values:
                full = self.encode(prefix + sep + spell.format(v))
                if len(full) != len(base) + 1 or full[: len(base)] != base:
                    break
                ids[v] = full[-1]
            if len(ids) == len(values) and len(set(ids.values())) == len(values):
                return sep, ids
        raise JudgeError(f"{self.model}: the scores {list(values)} are not single tokens after {prefix[-20:]!r}")

    def next_logits(self, text: str, ids: Mapping[int, int]) -> dict[int, float]:
        """The next-token logits after ``text``, for each allowed value's token."""
        import torch

        input_ids = torch.tensor([self.encode(text)], device=self.lm.device)
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit and input_ids.shape[1] > limit:
            raise JudgeError(f"prompt is {input_ids.shape[1]} tokens, over the judge's {limit}")
        with torch.no_grad():
            logits = self.lm(input_ids=input_ids).logits[0, -1].float()
        return {v: float(logits[t]) for v, t in ids.items()}


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
