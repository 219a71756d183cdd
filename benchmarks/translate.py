"""``python -m benchmarks.translate``: kullm's translation client against a sequential loop of the same requests.

    python -m benchmarks.translate                                  # the table in BENCHMARKS.md
    python -m benchmarks.translate --rows 1000 --per-text-rows 20 --repeats 1 --out /tmp/t.md   # a quick run

Both sides talk to the same fake servers on 127.0.0.1 (``tests/deepl_server.py``, ``tests/chat_server.py``), which
answer each request after ``--latency`` seconds (a remote API's round trip) and refuse with 429 + ``Retry-After``
any request beyond ``--server-limit`` in flight (a rate limit). The sequential loops are what a translation script
does: ``httpx.Client`` posting one request after the other, the same bodies kullm sends. kullm's side is
:func:`kullm.translation.backends.translate_many` with ``concurrency`` at the server's limit (and once above it,
to show what a rate limit does to a client that ignores it). Rows/s counts texts translated per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import ROOT
from benchmarks.report import write_report

sys.path.insert(0, str(ROOT / "tests"))  # the fake servers the tests use

from chat_server import ChatServer  # noqa: E402
from deepl_server import DeepLServer, fake_korean  # noqa: E402

from kullm.translation.backends import build_backend, translate_many, xml_escape  # noqa: E402

WORDS = (
    "write a short story about the sea explain how photosynthesis works in plants list three ways to save energy "
    "at home describe the history of the printing press give an example of a function in python"
).split()


def workload(n: int) -> list[str]:
    """``n`` distinct English texts of 5 to 60 words (deterministic)."""
    out = []
    for i in range(n):
        length = 5 + (i * 37) % 56
        out.append(" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)).capitalize() + f" ({i}).")
    return out


def deepl_cfg(url: str, concurrency: int) -> dict[str, Any]:
    return {"name": "deepl", "base_url": url, "api_key_env": "KULLM_BENCH_NO_KEY", "concurrency": concurrency,
            "backoff_base": 0.05, "backoff_max": 1.0, "max_retries": 20}  # fmt: skip


def openai_cfg(url: str, concurrency: int) -> dict[str, Any]:
    return {"name": "openai", "base_url": url, "model": "bench", "api_key_env": "KULLM_BENCH_NO_KEY",
            "concurrency": concurrency, "backoff_base": 0.05, "backoff_max": 1.0, "max_retries": 20}  # fmt: skip


def run_kullm(cfg: dict[str, Any], texts: list[str]) -> float:
    async def go() -> float:
        backend = build_backend(cfg)
        try:
            t0 = time.perf_counter()
            out = await translate_many(backend, texts)
            elapsed = time.perf_counter() - t0
        finally:
            await backend.aclose()
        assert not out.failed and len(out.translations) == len(texts), out.failed
        return elapsed

    return asyncio.run(go())


def run_sequential(url: str, bodies: list[dict[str, Any]], retry_after: float) -> float:
    """One request after the other (waiting out a 429 as the server asks), as a plain script does."""
    with httpx.Client(timeout=60.0) as client:
        t0 = time.perf_counter()
        for body in bodies:
            while True:
                r = client.post(url, json=body)
                if r.status_code != 429:
                    break
                time.sleep(retry_after)
            r.raise_for_status()
            r.json()
        return time.perf_counter() - t0


def deepl_bodies(backend_cfg: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    backend = build_backend(backend_cfg)
    bodies = [{**backend.body, "text": [xml_escape(t) for t in b]} for b in backend.batches(texts)]  # type: ignore[attr-defined]
    asyncio.run(backend.aclose())
    return bodies


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each case's seconds per repeat: (name, what, rows, {variant: [seconds]})."""
    texts = workload(args.rows)
    few = texts[: args.per_text_rows]
    limit, lat, ra = args.server_limit, args.latency, 0.2
    cases: list[dict[str, Any]] = []

    def add(server: ChatServer, name: str, what: str, rows: int, runs: dict[str, Any]) -> None:
        times: dict[str, list[float]] = {k: [] for k in runs}
        refused = dict.fromkeys(runs, 0)  # 429s the server answered, per variant (all repeats)
        for rep in range(args.repeats):
            for variant, fn in runs.items():
                before = server.served["429"]
                times[variant].append(fn())
                refused[variant] += server.served["429"] - before
                print(f"bench: {name} {variant} repeat {rep}: {rows / times[variant][-1]:.1f} rows/s", flush=True)
        cases.append({"name": name, "what": what, "rows": rows, "times": times, "refused": refused})

    with DeepLServer(delay_s=lat, max_concurrent=limit, retry_after=str(ra), lifetime=3600) as s:
        url = s.url + "/v2/translate"
        add(
            s,
            "deepl",
            f"DeepL protocol, {args.rows} texts in requests of 50",
            args.rows,
            {
                "sequential": lambda: run_sequential(url, deepl_bodies(deepl_cfg(s.url, 1), texts), ra),
                "kullm": lambda: run_kullm(deepl_cfg(s.url, limit), texts),
                "kullm_over": lambda: run_kullm(deepl_cfg(s.url, 2 * limit), texts),
            },
        )
        per_text = deepl_cfg(s.url, 1) | {"batch_size": 1}
        add(
            s,
            "deepl_per_text",
            f"DeepL protocol, {len(few)} texts: the seed's loop (one text per request) vs kullm (batches of 50)",
            len(few),
            {
                "sequential": lambda: run_sequential(url, deepl_bodies(per_text, few), ra),
                "kullm": lambda: run_kullm(deepl_cfg(s.url, limit), few),
            },
        )
    with ChatServer(reply=fake_korean, delay_s=lat, lifetime=3600) as c:
        backend = build_backend(openai_cfg(c.url, 1))
        bodies = [{**backend.body, "messages": backend.messages(t)} for t in few]  # type: ignore[attr-defined]
        asyncio.run(backend.aclose())
        add(
            c,
            "openai",
            f"OpenAI-compatible chat endpoint, one text per request, {len(few)} texts",
            len(few),
            {
                "sequential": lambda: run_sequential(c.url + "/chat/completions", bodies, ra),
                "kullm": lambda: run_kullm(openai_cfg(c.url, limit), few),
            },
        )
    return cases


def section(args: argparse.Namespace, cases: list[dict[str, Any]], command: str, elapsed: float) -> str:
    def rate(rows: int, ts: list[float]) -> float:
        return rows / statistics.median(ts)

    lines = [
        "<!-- bench:translate -->",
        "## Translation client (issue #27) on cpu\n",
        f"Generated by `python -m benchmarks.translate` on {time.strftime('%Y-%m-%d %H:%M')} UTC in "
        f"{elapsed / 60:.1f} min (load average {os.getloadavg()[0]:.1f} at the end):\n",
        f"```\n{command}\n```\n",
        f"- Fake servers on 127.0.0.1 (`tests/deepl_server.py`, `tests/chat_server.py`): each reply after "
        f"{args.latency:g} s; the DeepL one allows {args.server_limit} requests in flight (beyond that: 429 with "
        "`Retry-After: 0.2` at once). `sequential` = `httpx.Client` posting the same bodies one after the other; "
        f"`kullm` = `translate_many` with `concurrency={args.server_limit}` (the limit); `kullm_over` = concurrency "
        f"{2 * args.server_limit}, above the limit. {args.repeats} repeats, variants alternating; rows/s from the "
        "median time, ratios per repeat (median, min–max).",
        "",
        "| case | variant | rows/s | ÷ sequential | 429s |",
        "|---|---|---:|---:|---:|",
    ]
    for case in cases:
        seq = case["times"]["sequential"]
        for variant, ts in case["times"].items():
            ratios = [a / b for a, b in zip(seq, ts, strict=True)]
            shown = "1" if variant == "sequential" else (
                f"**{statistics.median(ratios):.1f}×** ({min(ratios):.1f}–{max(ratios):.1f})"
            )  # fmt: skip
            rows, refused = case["rows"], case["refused"][variant]
            lines.append(f"| {case['what']} | `{variant}` | {rate(rows, ts):.1f} | {shown} | {refused} |")
    over = next((c for c in cases if "kullm_over" in c["times"]), None)
    if over is not None:
        gain = rate(over["rows"], over["times"]["kullm_over"]) / rate(over["rows"], over["times"]["kullm"]) - 1
        lines += [
            "",
            f"- `kullm_over`: {over['refused']['kullm_over']} requests refused with 429 and retried after "
            f"`Retry-After`, for {gain:+.0%} rows/s against `kullm`: the server's limit bounds the rate, a higher "
            "concurrency only adds refused requests (which a real API may count against the key). Size "
            "`backend.concurrency` to the plan's limit.",
        ]
    lines += ["", "<!-- /bench:translate -->\n"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    summary, usage = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.translate",
        description=summary,
        epilog="examples:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=5000, help="texts in the batched DeepL case")
    p.add_argument("--per-text-rows", type=int, default=100, help="texts in the one-per-request cases")
    p.add_argument("--latency", type=float, default=0.25, help="seconds the servers take per request")
    p.add_argument("--server-limit", type=int, default=8, help="requests in flight the servers allow")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    os.environ.pop("KULLM_BENCH_NO_KEY", None)  # no key: the fake servers take none
    logging.getLogger("kullm").setLevel(logging.ERROR)  # not the no-key warning at every backend built
    command = "python -m benchmarks.translate " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    cases = measure(args)
    text = section(args, cases, command.strip(), time.perf_counter() - t0)
    print(text)
    if args.out.exists():
        write_report(args.out, args, text, "translate")  # its own section replaced, the rest kept
    else:
        args.out.write_text("# Benchmarks\n\n" + text, encoding="utf-8")
    print(f"bench: wrote {args.out}")


if __name__ == "__main__":
    main()
