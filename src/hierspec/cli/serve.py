"""``hierspec serve``: an OpenAI-compatible HTTP server over one target (`hierspec.serve.app`).

    hierspec serve                                     # SmolLM2 (embedded), ngram, gamma auto
    hierspec serve --model qwen2.5-coder-1.5b --method draft:qwen2.5-coder-0.5b --port 8080
    hierspec serve --backend torch --method suffix --api-key secret
    hierspec serve --worker serial                     # one request at a time (no batching)

Checks every flag, opens the target (``--model`` / ``--backend`` as ``generate``), chooses the
worker (`hierspec.serve.factory.make_worker`: continuous batching on llama.cpp where it exists,
else one request at a time), builds and warms up the default method, binds the socket (``--port
0``: a free one), prints one startup line on stderr naming the worker and the address, and serves
until SIGINT / SIGTERM: uvicorn stops accepting, streams in flight get a grace period, the
worker shuts down, exit status 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from .flags import CliError

__all__ = ["add_serve_arguments", "run_serve"]


def add_serve_arguments(p: Any) -> None:
    """serve's own flags (the model flags are `generate`'s, added by the caller)."""
    from .flags import method_type

    p.add_argument(
        "--method", default="ngram", type=method_type, help="default method spec of requests (default ngram)"
    )
    p.add_argument("--gamma", default="auto", help="default draft tokens per step: an integer >= 1 or auto")
    p.add_argument(
        "--rule", default="block", choices=("token", "block", "hsd", "match"), help="default rule at T > 0"
    )
    p.add_argument(
        "--draft-sampling",
        default="sample",
        choices=("sample", "greedy"),
        help="at T > 0, how a draft model drafts: sample from q (default) or its argmax (the engines' "
        "practice); methods without a draft model ignore it",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (batching worker)")
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not reuse the cells of earlier requests for prompts that share a prefix",
    )
    p.add_argument(
        "--cache-ram",
        type=int,
        default=1024,
        help="MiB of host copies of earlier requests' cells for prefix reuse (0: in place only)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond: HTTP 429")
    p.add_argument(
        "--api-key",
        default=os.environ.get("HIERSPEC_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $HIERSPEC_API_KEY, else none)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for decoding (default: all)")
    p.add_argument(
        "--worker",
        default="auto",
        choices=("auto", "serial", "batch"),
        help="auto: continuous batching on llama.cpp for the methods it batches (ar, ngram, suffix), "
        "else one request at a time; serial / batch: insist",
    )


def _check(args: Any) -> tuple[Any, int]:
    """Everything checked before a model is loaded: (method spec, gamma)."""
    from ..methods import MethodError, entry_of, parse_method
    from ..methods.spec import parse_gamma

    try:
        gamma = parse_gamma(args.gamma)
    except ValueError:
        raise CliError(f"--gamma must be >= 1 (or auto), got {args.gamma}") from None
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port: expected 0..65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    if args.cache_ram < 0:
        raise CliError(f"--cache-ram must be >= 0 (MiB), got {args.cache_ram}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.api_key is not None and not args.api_key.strip():
        raise CliError("--api-key is empty")
    try:
        spec = parse_method(args.method)
    except MethodError as err:
        raise CliError(f"--method: {err}") from None
    entry = entry_of(spec)
    if args.draft_sampling != "sample" and not entry.draft_sampling:
        raise CliError(
            f"--draft-sampling {args.draft_sampling}: --method {spec.name} drafts without a draft model "
            "(give a draft:, hier: or other model-drafting method)"
        )
    if entry.peer:
        raise CliError(f"--method {spec.kind} is a peer for `hierspec bench`, not a served method")
    if entry.remote:
        raise CliError(
            f"--method {spec.kind} is not served (its drafter runs in a second process); use generate"
        )
    return spec, gamma


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (errors name the flags)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as err:
        raise CliError(f"--host/--port: cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def _set_threads(model: Any, threads: int) -> None:
    """Decode with ``threads`` CPU threads (torch, and a llama.cpp context when there is one)."""
    import torch

    torch.set_num_threads(threads)
    lcp, ctx = getattr(model, "_lcp", None), getattr(model, "_ctx", None)
    if lcp is not None and ctx is not None:
        lcp.llama_set_n_threads(ctx, threads, threads)
        model.n_threads = threads


def run_serve(args: Any) -> int:
    import uvicorn

    from ..methods import MethodError, ModelSet, needs
    from ..models.open import open_target
    from ..serve.app import ServeDefaults, create_app
    from ..serve.factory import make_worker
    from .generate import _device as check_device

    spec, gamma = _check(args)
    device = check_device(args.device)
    opened = open_target(
        args.model, backend=args.backend, dtype=args.dtype, device=device, needs=needs([spec])
    )
    target, tok = opened.model, opened.tokenizer
    if args.threads is not None:
        _set_threads(target, args.threads)
    import torch

    models = ModelSet(target, tok, dtype=getattr(torch, args.dtype), backend=opened.backend, name=opened.name)
    chosen = make_worker(
        models,
        method=spec.name,
        gamma=gamma,
        rule=args.rule,
        draft_sampling=args.draft_sampling,
        prefix_cache=args.prefix_cache,
        cache_bytes=args.cache_ram << 20,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        threads=args.threads,
        worker=args.worker,
    )
    sock = _bind(args.host, args.port)
    try:
        chosen.worker.start()
    except MethodError as err:
        sock.close()
        raise CliError(f"--method: {err}") from None
    defaults = ServeDefaults(method=spec.name, gamma=gamma, rule=args.rule)
    app = create_app(
        chosen.worker,
        tok,
        opened.name,
        context_length=int(target.max_length),
        vocab_size=int(target.vocab_size),
        backend=opened.backend,
        api_key=args.api_key,
        defaults=defaults,
    )
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        log_level="info",
        timeout_graceful_shutdown=int(defaults.shutdown_grace_s) + 5,
        timeout_keep_alive=5,
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    draft_note = f", draft sampling {args.draft_sampling}" if args.draft_sampling != "sample" else ""
    ready = (
        f"hierspec serve: {opened.name} on {opened.backend}, {chosen.name} ({chosen.why}), method "
        f"{spec.name}, gamma {gamma or 'auto'}, rule {args.rule}{draft_note}, context {target.max_length}"
        f"{', API key required' if args.api_key else ''}; listening on {url}"
    )
    _uvicorn_server(config, ready).run(sockets=[sock])
    print("hierspec serve: stopped", file=sys.stderr, flush=True)
    return 0


def _uvicorn_server(config: Any, ready: str) -> Any:
    """uvicorn's server, except that it prints ``ready`` on stderr once it serves (signals are
    then handled: Ctrl-C stops it gracefully), and that the signal that stopped it is a normal end
    (exit status 0): uvicorn re-raises a captured SIGINT / SIGTERM after its graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, file=sys.stderr, flush=True)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)
