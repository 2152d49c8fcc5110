"""``hierspec bench-serve``: OpenAI-compatible servers under concurrent load, in one run.

For every server (hierspec serve with several methods, llama.cpp's C++ ``llama-server`` in its
plain and speculative modes, llama-cpp-python's ``llama_cpp.server``), on the same GGUF with the
same threads and slots, and every concurrency c: c clients each stream chat completions (greedy,
``max_tokens``) of prompts taken in turn from the sets, until every prompt was sent once. Per
level it records throughput (completion tokens / wall seconds of the level), time to first token
and inter-token latency (seconds between streamed chunks, per token) at p50 / p95, and, for
hierspec, the server's own speculation counters. Servers run one at a time as subprocesses on a
free port; levels are appended to ``results.json`` as they finish (a rerun with the same
``--out`` skips finished ones), so a long run survives a restart.

Batching bound: the server-side cost curve hierspec reports (``/health``) gives
c(1) and c(4), so 4 c(1) / c(4) (what 4 concurrent plain sequences can gain) is in the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SERVER_START_S = 300.0


@dataclass(frozen=True)
class Target:
    """One server configuration. ``kind``: hierspec | llama-server | llama-cpp-python; ``body``:
    extra request fields (hierspec's method / gamma); ``args``: extra server flags."""

    label: str
    kind: str
    body: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()


def default_targets(llama_server: str | None) -> list[Target]:
    out = [
        Target("hierspec ar", "hierspec", {"method": "ar"}),
        Target("hierspec ngram auto (default)", "hierspec", {}),
        Target("hierspec ngram gamma 4", "hierspec", {"method": "ngram", "gamma": 4}),
    ]
    if llama_server:
        out += [
            Target("llama-server ar", "llama-server"),
            Target("llama-server ngram-simple", "llama-server", args=("--spec-type", "ngram-simple")),
        ]
    out.append(Target("llama-cpp-python server", "llama-cpp-python"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(
    t: Target, gguf: str, port: int, threads: int, slots: int, ctx: int, exe: str | None
) -> list[str]:
    if t.kind == "hierspec":
        return [
            str(Path(sys.executable).with_name("hierspec")),
            "serve",
            "--backend",
            "llama.cpp",
            "--model",
            gguf,
            "--port",
            str(port),
            "--max-batch",
            str(slots),
            "--threads",
            str(threads),
            *t.args,
        ]
    if t.kind == "llama-server":
        return [
            exe or "llama-server",
            "-m",
            gguf,
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(ctx * slots),
            "--parallel",
            str(slots),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-webui",
            *t.args,
        ]
    if t.kind == "llama-cpp-python":
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            gguf,
            "--n_threads",
            str(threads),
            "--n_ctx",
            str(ctx),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *t.args,
        ]
    raise ValueError(f"target kind: expected hierspec, llama-server or llama-cpp-python, got {t.kind!r}")


# ------------------------------------------------------------------------------ the client
async def _one(
    client: Any, url: str, messages: list[dict], body: dict, max_tokens: int, count: Any = None
) -> dict:
    """Stream one chat completion; returns its timings, text and token count."""
    payload = {
        "model": body.get("model", "default"),
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    t0 = time.perf_counter()
    first, chunks, text, usage, last = None, [], [], None, t0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            usage = obj.get("usage") or usage
            delta = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices") or [])
            if delta:
                now = time.perf_counter()
                first = first or now
                chunks.append(now - last)
                last = now
                text.append(delta)
    tokens = (usage or {}).get("completion_tokens")
    if tokens is None and count is not None:  # a server that reports no usage in streams
        tokens = count("".join(text))
    return {
        "ttft": None if first is None else first - t0,
        "gaps": chunks[1:],
        "text": "".join(text),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "spec": (usage or {}).get("spec_decode"),
    }


async def run_level(
    url: str,
    prompts: Sequence[list[dict]],
    body: dict,
    concurrency: int,
    max_tokens: int,
    count: Any = None,
) -> dict:
    """Every prompt once, ``concurrency`` clients at a time; the level's summary. ``count``:
    text -> tokens, for servers whose streams report no usage."""
    import httpx

    queue = list(enumerate(prompts))
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while queue:
                i, msgs = queue.pop(0)
                results[i] = await _one(client, url, msgs, body, max_tokens, count)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize([results[i] for i in sorted(results)], wall, concurrency)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(res: list[dict], wall: float, concurrency: int) -> dict:
    errors = [r["error"] for r in res if "error" in r]
    ok = [r for r in res if "error" not in r]
    tokens = sum(r["tokens"] or 0 for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "concurrency": concurrency,
        "requests": len(res),
        "errors": errors,
        "wall_s": wall,
        "tokens": tokens,
        "tok_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": _pct(ttft, 0.5),
        "ttft_p95": _pct(ttft, 0.95),
        "itl_p50": _pct(gaps, 0.5),
        "itl_p95": _pct(gaps, 0.95),
        "texts": [r.get("text") for r in res],
        "spec": [r.get("spec") for r in ok if r.get("spec")],
    }


# ------------------------------------------------------------------------------ servers
class Server:
    """A server subprocess on ``port``; waits for /v1/models (or /health) to answer."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.model = "default"
        self.log = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.perf_counter() + SERVER_START_S
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: see {log}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2.0)
                if r.status_code == 200:
                    data = r.json().get("data") or [{}]
                    self.model = str(data[0].get("id", "default"))  # the name the server answers to
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer within {SERVER_START_S:.0f} s: see {log}")

    def health(self) -> dict:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------ the run
def bench_serve(
    out: Path,
    gguf: str,
    prompts: Sequence[list[dict]],
    targets: Sequence[Target],
    concurrency: Sequence[int],
    *,
    max_tokens: int = 128,
    threads: int = 2,
    slots: int = 4,
    ctx: int = 2048,
    llama_server: str | None = None,
    repeats: int = 1,
    count: Any = None,
) -> dict:
    """Run every target at every concurrency (``repeats`` times), checkpointing into
    ``out/results.json``; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"levels": {}, "health": {}}
    groups: dict[tuple, list[Target]] = {}
    for t in targets:  # targets that differ only in their request body share one server
        groups.setdefault((t.kind, t.args), []).append(t)
    for (kind, _), group in groups.items():
        todo = [
            (t, c, r)
            for t in group
            for r in range(repeats)
            for c in concurrency
            if f"{t.label}|{c}|{r}" not in results["levels"]
        ]
        if not todo:
            continue
        if kind == "llama-cpp-python" and not _has("llama_cpp.server"):
            print(f"bench-serve: skipping {kind}: llama-cpp-python[server] is not installed", file=sys.stderr)
            continue
        port = free_port()
        cmd = server_command(group[0], gguf, port, threads, slots, ctx, llama_server)
        print(f"bench-serve: {' '.join(cmd)}", file=sys.stderr)
        try:
            server = Server(cmd, port, out / f"{_slug(group[0].label)}.log")
        except RuntimeError as err:  # a server that does not start: noted, the others still run
            results.setdefault("failed", {})[" / ".join(t.label for t in group)] = str(err)
            print(f"bench-serve: {err}", file=sys.stderr)
            _write(path, results)
            continue
        try:
            for t in group:
                body = {**t.body, "model": server.model}
                asyncio.run(run_level(server.url, prompts[:2], body, 1, 8))  # warm-up, not timed
            for t, c, r in todo:
                before = server.health() if kind == "hierspec" else {}
                body = {**t.body, "model": server.model}
                lvl = asyncio.run(run_level(server.url, prompts, body, c, max_tokens, count))
                lvl.update(label=t.label, repeat=r)
                if before:
                    lvl["scheduler"] = _scheduler_delta(before, server.health())
                results["levels"][f"{t.label}|{c}|{r}"] = lvl
                print(
                    f"  {t.label} c={c} r={r}: {lvl['tok_per_s']:.1f} tok/s, ttft p95 {lvl['ttft_p95']}, "
                    f"errors {len(lvl['errors'])}",
                    file=sys.stderr,
                )
                _write(path, results)
            if kind == "hierspec":
                results["health"][kind] = server.health()
                _write(path, results)
        finally:
            server.stop()
    results["targets"] = [asdict(t) for t in targets]
    _write(path, results)
    return results


def _scheduler_delta(before: dict, after: dict) -> dict:
    """What the batch worker did during one level: steps, drafted rows kept per step and per
    decoding row (speculation shrinking under load shows here)."""
    b, a = before.get("worker") or before, after.get("worker") or after
    keys = ("steps", "draft_rows", "decode_rows")
    if not all(isinstance(a.get(k), int) and isinstance(b.get(k), int) for k in keys):
        return {}
    d = {k: a[k] - b[k] for k in keys}
    d["draft_rows_per_step"] = d["draft_rows"] / d["steps"] if d["steps"] else 0.0
    d["draft_share_of_rows"] = d["draft_rows"] / d["decode_rows"] if d["decode_rows"] else 0.0
    return d


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-")


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def find_llama_server(given: str | None) -> str | None:
    """``given``, else ``llama-server`` on PATH, else the `make peers` build; None if absent."""
    if given:
        return given
    found = shutil.which("llama-server")
    if found:
        return found
    built = Path("build/peers/llama-server")
    return str(built) if built.exists() else None


def median_levels(results: dict) -> dict[tuple[str, int], dict]:
    """Per (target, concurrency): the medians over repeats of throughput and latencies."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for lvl in results["levels"].values():
        groups.setdefault((lvl["label"], lvl["concurrency"]), []).append(lvl)
    out = {}
    for key, lvls in groups.items():
        med = {}
        for name in ("tok_per_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95"):
            xs = [v[name] for v in lvls if v.get(name) is not None]
            med[name] = statistics.median(xs) if xs else None
        med["repeats"] = len(lvls)
        med["errors"] = sum(len(v["errors"]) for v in lvls)
        out[key] = med
    return out
