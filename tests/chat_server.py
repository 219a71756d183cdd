"""A real chat-completions HTTP server on 127.0.0.1 for judge tests, with programmable faults.

Each request is keyed (by default: the Response text in the judge prompt's user message) and counted; a fault
plan ``faults(key, n)`` picks what the n-th request for that key gets:

``ok``          a normal reply in the prompt's result format (scores from ``scores(key)``)
``429``         HTTP 429 with ``Retry-After: <retry_after>``
``500``/``503`` server errors
``slow``        the reply only after ``slow_s`` seconds (past the client's timeout)
``truncated``   a 200 whose body is cut half-way and the connection closed
``badjson``     a complete 200 body that is not JSON
``deep``        a 200 body of 200,000 ``[`` (too deep for any JSON decoder's recursion)
``surrogate``   a valid reply whose text holds a lone surrogate (the JSON escape ``\\ud800``)
``garbage``     a valid reply whose text holds no scores
``outofrange``  a valid reply scoring 이해 가능성 as 7
``drop``        the connection closed without any response
``401``         unauthorised
``length``      a valid reply cut at max_tokens (``finish_reason: "length"``)

``reply=`` (a function of the key) makes the reply text something else than scores: a translation, for the
OpenAI-compatible translation backend (``tests/deepl_server.py`` ``fake_korean``).

The server runs in a daemon thread on a random free port and stops itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CRITERIA = [
    ("이해 가능성", 0, 1),
    ("자연스러움", 1, 3),
    ("맥락 유지", 1, 3),
    ("흥미롭기", 1, 3),
    ("Instruction 사용", 0, 1),
    ("전반적인 품질", 1, 5),
]
KINDS = ("429", "500", "503", "slow", "truncated", "badjson", "garbage", "drop")


def default_scores(key: str) -> dict[str, int]:
    """Deterministic scores per key (a hash of it), each inside its criterion's range."""
    h = hashlib.sha256(key.encode()).digest()
    return {name: lo + h[k] % (hi - lo + 1) for k, (name, lo, hi) in enumerate(CRITERIA)}


def default_probs(key: str, name: str, chosen: int) -> dict[str, float]:
    """Top-logprob alternatives at a score token: the chosen value 0.6, the other allowed values share 0.3,
    and a token that is no score (``" 점"``) gets 0.1 (a correct client ignores it)."""
    lo, hi = next((lo, hi) for n, lo, hi in CRITERIA if n == name)
    others = [v for v in range(lo, hi + 1) if v != chosen]
    probs = {f" {chosen}": 0.6, " 점": 0.1}
    probs |= {f" {v}": 0.3 / len(others) for v in others}
    return probs


def response_key(messages: list[dict]) -> str:
    """The Response text of the judge prompt's user message (the whole message if it has no such block)."""
    user = next((m["content"] for m in messages if m.get("role") == "user"), "")
    m = re.search(r"Response:\n(.*?)\n\n\nResult", user, re.S)
    return m.group(1) if m else user


def script(plan: dict[str, list[str]], default: str = "ok") -> Callable[[str, int], str]:
    """Faults from a table: the n-th request for ``key`` gets ``plan[key][n-1]``, later ones ``default``."""
    return lambda key, n: plan.get(key, [])[n - 1] if n <= len(plan.get(key, [])) else default


def random_faults(rate: float, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Callable[[str, int], str]:
    """Each request independently faulty with probability ``rate`` (deterministic in key, n and seed)."""

    def pick(key: str, n: int) -> str:
        rng = random.Random(f"{seed}:{key}:{n}")
        return rng.choice(kinds) if rng.random() < rate else "ok"

    return pick


def reply_text(scores: dict[str, float], reason: bool = True) -> str:
    lines = [f"- {name} ({lo} - {hi}): {scores[name]}" for name, lo, hi in CRITERIA]
    return "\n".join(lines) + ("\n\n이유: 응답이 지시를 따릅니다." if reason else "")


class ChatServer:
    """``with ChatServer(faults=...) as s: ... s.url ...``; ``s.counts[key]`` is the requests seen per key."""

    handler: type[BaseHTTPRequestHandler]  # set below: _Handler (a subclass may answer another protocol)

    def __init__(
        self,
        faults: Callable[[str, int], str] | None = None,
        scores: Callable[[str], dict[str, float]] = default_scores,
        probs: Callable[[str, str, int], dict[str, float]] = default_probs,
        key: Callable[[list[dict]], str] = response_key,
        reply: Callable[[str], str] | None = None,
        retry_after: str = "0",
        slow_s: float = 2.0,
        delay_s: float = 0.0,
        lifetime: float = 300.0,
    ) -> None:
        self.faults = faults or (lambda key, n: "ok")
        self.scores, self.probs, self.key = scores, probs, key
        self.reply = reply  # key -> the reply text (e.g. a translation), instead of scores in the result format
        self.retry_after, self.slow_s, self.delay_s, self.lifetime = retry_after, slow_s, delay_s, lifetime
        self.counts: Counter[str] = Counter()
        self.served: Counter[str] = Counter()  # fault kind -> requests answered that way
        self.requests: list[dict] = []  # the request bodies, in arrival order
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []  # the request targets (path and query), in arrival order
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (self.handler,), {"owner": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        timer = threading.Timer(self.lifetime, self.stop)
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        self._stop.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def _next(self, body: dict) -> tuple[str, str]:
        key = self.key(body.get("messages") or [])
        with self._lock:
            self.counts[key] += 1
            kind = self.faults(key, self.counts[key])
            self.served[kind] += 1
            self.requests.append(body)
        return key, kind

    def completion(self, body: dict, key: str, kind: str) -> dict:
        scores = self.scores(key)
        if kind == "outofrange":
            scores = {**scores, CRITERIA[0][0]: 7}
        text = "I cannot evaluate this response." if kind == "garbage" else reply_text(scores)
        if self.reply is not None and kind != "garbage":
            text = self.reply(key)
        finish = "length" if kind == "length" else "stop"  # length: the reply cut at max_tokens
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if body.get("logprobs") and kind != "garbage":
            choice["logprobs"] = {"content": self._logprobs(key, scores, int(body.get("top_logprobs") or 5))}
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"), "choices": [choice]}

    def _logprobs(self, key: str, scores: dict[str, float], top: int) -> list[dict]:
        """The reply as tokens: each line's head, its score (with top alternatives), then the line end."""
        text, out = reply_text(scores), []
        tail = text[text.index("\n\n") :]
        for k, (name, lo, hi) in enumerate(CRITERIA):
            head = f"- {name} ({lo} - {hi}):"
            alts = sorted(self.probs(key, name, scores[name]).items(), key=lambda kv: -kv[1])[:top]
            tok = f" {scores[name]}"
            sep = "\n" if k < len(CRITERIA) - 1 else tail
            out.append(_token(head, 0.0, [(head, 0.0)]))
            out.append(_token(tok, math.log(dict(alts).get(tok, 1e-9)), [(t, math.log(p)) for t, p in alts]))
            out.append(_token(sep, 0.0, [(sep, 0.0)]))
        assert "".join(t["token"] for t in out) == text
        return out


def _token(tok: str, lp: float, alts: list[tuple[str, float]]) -> dict:
    return {"token": tok, "logprob": lp, "top_logprobs": [{"token": t, "logprob": a} for t, a in alts]}


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the stdlib's 5 drops bursts of connects (the client then sees connect timeouts)
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    owner: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        return None

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        s = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with s._lock:
            s.paths.append(self.path)
        if not urlsplit(self.path).path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, b'{"error": {"message": "not found"}}')
        body = json.loads(raw)
        with s._lock:
            s.headers.append(dict(self.headers))
        key, kind = s._next(body)
        with s._lock:
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            self._answer(body, key, kind)
        finally:
            with s._lock:
                s.in_flight -= 1

    def _answer(self, body: dict, key: str, kind: str) -> None:
        s = self.owner
        if s.delay_s:
            s._stop.wait(s.delay_s)
        if kind == "drop":
            self.close_connection = True
            return
        if kind in ("429", "500", "503", "401"):
            extra = {"Retry-After": s.retry_after} if kind == "429" else {}
            return self._send(int(kind), b'{"error": {"message": "fault"}}', extra)
        if kind == "slow":
            s._stop.wait(s.slow_s)
        if kind == "badjson":
            return self._send(200, b'{"id": "chatcmpl-test", "choices": [{"message": ')
        if kind == "deep":
            return self._send(200, b"[" * 200_000)
        if kind == "surrogate":  # json.dumps writes the lone surrogate as the escape \ud800
            text = "\ud800" + reply_text(s.scores(key))
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            return self._send(200, json.dumps(reply).encode())
        if kind == "echo400":  # a server that echoes the request headers in its error body
            return self._send(400, json.dumps({"error": {"headers": dict(self.headers)}}).encode())
        if kind == "echo":  # ... or in its reply
            text = reply_text(s.scores(key)) + f"\n(seen: {self.headers.get('Authorization')})"
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            return self._send(200, json.dumps(reply).encode())
        if kind == "huge":
            return self._send(200, b'{"choices": [], "pad": "' + b"x" * (8 << 20) + b'"}')
        if kind == "drip":  # headers at once, then the body a byte at a time (a per-read timeout never fires)
            data = json.dumps(s.completion(body, key, kind)).encode()
            return self._drip(data)
        data = json.dumps(s.completion(body, key, kind), ensure_ascii=False).encode()
        if kind == "truncated":
            return self._send(200, data, cut=len(data) // 2)
        return self._send(200, data)

    def _drip(self, data: bytes) -> None:
        """Headers at once, then the body a byte every 50 ms (a per-read timeout never fires)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                if self.owner._stop.wait(0.05):
                    break
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _send(self, status: int, data: bytes, extra: dict[str, str] | None = None, cut: int | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data if cut is None else data[:cut])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer
        if cut is not None:
            self.close_connection = True


ChatServer.handler = _Handler
