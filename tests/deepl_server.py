"""A real DeepL-protocol HTTP server on 127.0.0.1 for translation tests, with programmable faults.

It speaks ``POST /v2/translate`` (a JSON body ``{"text": [...], "target_lang": ..., "tag_handling": "xml", ...}``,
answering ``{"translations": [{"detected_source_language": "EN", "text": ...}]}``) and ``GET /v2/usage``, checks the
``Authorization: DeepL-Auth-Key <key>`` header when given a key, and with ``tag_handling=xml`` refuses a text that is
not well-formed XML (400, as DeepL does). Translations are :func:`fake_korean`: every English word becomes Hangul,
tags and character references stay as they are, so protected-span masks survive.

It is :class:`chat_server.ChatServer`'s machinery (thread, random port, lifetime, counts, fault plans) with its own
handler. Each request is keyed by its first text; ``faults(key, n)`` picks what the n-th request for that key gets:

``ok``          the translations
``429``         HTTP 429 with ``Retry-After: <retry_after>``
``456``         quota exceeded
``500``/``503`` server errors
``403``         a refused key
``slow``        the reply only after ``slow_s`` seconds
``drip``        headers at once, then the body a byte every 50 ms (a per-read timeout never fires)
``drop``        the connection closed without any response
``badjson``     a 200 whose body is not JSON
``wrongcount``  a 200 with one translation fewer than the texts sent
``echo``        translations that carry the request's Authorization header (a server leaking the key)

Besides the plan: ``quota_chars`` (456 for every request once that many characters were billed),
``max_concurrent`` (429 for a request beyond that many in flight: a rate limit) and ``delay_s`` (latency).
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from urllib.parse import urlsplit

from chat_server import ChatServer, _Handler

_WORDS = re.compile(r"<[^>]*>|&[#\w]+;|[A-Za-z]+")


def fake_korean(text: str) -> str:
    """``text`` with every run of Latin letters replaced by Hangul syllables (deterministic in the word), tags
    (``<x id="3"/>``) and character references (``&amp;``) kept byte for byte."""

    def word(m: re.Match) -> str:
        w = m.group()
        if w[0] in "<&":
            return w
        h = hashlib.sha256(w.lower().encode()).digest()
        return "".join(chr(0xAC00 + (h[2 * i] << 8 | h[2 * i + 1]) % 11172) for i in range(1 + len(w) // 3))

    return _WORDS.sub(word, text)


class DeepLServer(ChatServer):
    """``with DeepLServer(faults=..., auth_key="k:fx") as s: ... s.url ...`` (the base URL: the client appends
    ``/v2/translate``); ``s.texts`` is every text received, ``s.billed`` the characters translated."""

    def __init__(
        self,
        faults: Callable[[str, int], str] | None = None,
        auth_key: str | None = None,
        translate: Callable[[str], str] = fake_korean,
        quota_chars: int | None = None,
        max_concurrent: int | None = None,
        retry_after: str = "0",
        slow_s: float = 2.0,
        delay_s: float = 0.0,
        lifetime: float = 300.0,
    ) -> None:
        super().__init__(faults, retry_after=retry_after, slow_s=slow_s, delay_s=delay_s, lifetime=lifetime)
        self.key = lambda body: (body.get("text") or [""])[0]  # type: ignore[assignment,misc]
        self.auth_key, self.translate = auth_key, translate
        self.quota_chars, self.max_concurrent = quota_chars, max_concurrent
        self.texts: list[str] = []  # every text received, in arrival order
        self.billed = 0  # characters translated (what DeepL counts against the quota)
        self.batch_sizes: list[int] = []

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def _next(self, body: dict) -> tuple[str, str]:
        key = self.key(body)
        with self._lock:
            self.counts[key] += 1
            kind = self.faults(key, self.counts[key])
            self.requests.append(body)
        return key, kind


class _DeepLHandler(_Handler):
    owner: DeepLServer  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        s = self.owner
        if urlsplit(self.path).path != "/v2/usage":
            return self._send(404, b'{"message": "not found"}')
        if not self._authorised():
            return self._send(403, b'{"message": "Authorization failed"}')
        limit = s.quota_chars if s.quota_chars is not None else 500_000
        return self._send(200, json.dumps({"character_count": s.billed, "character_limit": limit}).encode())

    def do_POST(self) -> None:  # noqa: N802
        s = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with s._lock:
            s.paths.append(self.path)
            s.headers.append(dict(self.headers))
        if urlsplit(self.path).path != "/v2/translate":
            return self._send(404, b'{"message": "not found"}')
        try:
            body = json.loads(raw)
            texts = body["text"]
            assert isinstance(texts, list) and all(isinstance(t, str) for t in texts) and body.get("target_lang")
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._send(400, b'{"message": "Bad request: text (a list) and target_lang are required"}')
        if len(texts) > 50:
            return self._send(413, b'{"message": "Request Entity Too Large: at most 50 texts"}')
        key, kind = s._next(body)
        with s._lock:
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            crowded = s.max_concurrent is not None and s.in_flight > s.max_concurrent
        try:
            if crowded:  # refused at once, as a rate limiter in front of the service does
                with s._lock:
                    s.served["429"] += 1
                return self._send(429, b'{"message": "Too many requests"}', {"Retry-After": s.retry_after})
            self._answer_deepl(body, texts, kind)
        finally:
            with s._lock:
                s.in_flight -= 1

    def _authorised(self) -> bool:
        s = self.owner
        return s.auth_key is None or self.headers.get("Authorization") == f"DeepL-Auth-Key {s.auth_key}"

    def _answer_deepl(self, body: dict, texts: list[str], kind: str) -> None:
        s = self.owner
        if s.delay_s:
            s._stop.wait(s.delay_s)
        if not self._authorised():
            kind = "403"
        chars = sum(len(t) for t in texts)
        with s._lock:
            if kind == "ok" and s.quota_chars is not None and s.billed + chars > s.quota_chars:
                kind = "456"
            s.served[kind] += 1
        if kind == "drop":
            self.close_connection = True
            return
        if kind in ("429", "456", "500", "503", "403"):
            extra = {"Retry-After": s.retry_after} if kind == "429" else {}
            message = {"456": "Quota Exceeded", "403": "Authorization failed"}.get(kind, "fault")
            return self._send(int(kind), json.dumps({"message": message}).encode(), extra)
        if body.get("tag_handling") == "xml":
            for t in texts:
                try:
                    ET.fromstring(f"<r>{t}</r>")
                except ET.ParseError:
                    return self._send(400, b'{"message": "Tag handling parsing failed, please check input."}')
        if kind == "slow":
            s._stop.wait(s.slow_s)
        if kind == "badjson":
            return self._send(200, b"<html><body>502 Bad Gateway</body></html>")
        out = [s.translate(t) for t in texts]
        if kind == "echo":
            out = [f"{o} (seen: {self.headers.get('Authorization')})" for o in out]
        if kind == "wrongcount":
            out = out[:-1]
        with s._lock:
            s.texts.extend(texts)
            s.billed += chars
            s.batch_sizes.append(len(texts))
        reply = {"translations": [{"detected_source_language": "EN", "text": o} for o in out]}
        data = json.dumps(reply, ensure_ascii=False).encode()
        if kind == "drip":
            return self._drip(data)
        return self._send(200, data)


DeepLServer.handler = _DeepLHandler
