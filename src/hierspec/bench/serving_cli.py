"""``hierspec bench-serve``: servers under concurrent load (`hierspec.bench.serving`).

    hierspec bench-serve --out bench-out/serve                      # every server found here
    hierspec bench-serve --servers hierspec --concurrency 1,4 --n 8 --max-tokens 64
    hierspec bench-serve --llama-server /path/to/llama-server --repeats 3

Prompts: the chat template's user turns of ``--sets`` (as `hierspec bench`), each sent once per
level. Results go to ``--out``/results.json (checkpointed per level: a rerun continues),
report.md and throughput.png. Errors in flags: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .lists import names, positive_ints

SERVERS = ("hierspec", "llama-server", "llama-cpp-python")


def main(argv: list[str] | None = None) -> int:
    from ..prompts import load_prompt_set
    from .serving import bench_serve, default_targets, find_llama_server
    from .serving_report import write_report

    ap = argparse.ArgumentParser(prog="hierspec bench-serve", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/serve"))
    ap.add_argument("--model", default="smollm2-135m", help="catalogue name or GGUF path (default SmolLM2)")
    ap.add_argument(
        "--sets",
        type=names(),
        default="chat,code",
        help="prompt sets, comma-separated (as `hierspec bench`)",
    )
    ap.add_argument("--n", type=int, default=8, help="prompts per set (default 8)")
    ap.add_argument(
        "--concurrency",
        type=positive_ints(),
        default="1,2,4,8",
        help="concurrent clients per level (default 1,2,4,8)",
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4, help="sequences a server decodes together (default 4)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot (default 2048)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--servers",
        type=names(SERVERS),
        default=",".join(SERVERS),
        help=f"subset of {', '.join(SERVERS)}",
    )
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: PATH, build/peers)")
    args = ap.parse_args(argv)
    conc, kinds = args.concurrency, args.servers
    for flag, value in (("--n", args.n), ("--max-tokens", args.max_tokens), ("--repeats", args.repeats)):
        if value < 1:
            ap.error(f"{flag}: expected an integer >= 1, got {value}")
    from ..models.catalog import resolve_model

    try:
        gguf = str(resolve_model(args.model).path)
    except (ValueError, FileNotFoundError) as err:
        print(f"hierspec bench-serve: --model: {err}", file=sys.stderr)
        return 2
    exe = find_llama_server(args.llama_server)
    if "llama-server" in kinds and exe is None:
        print(
            "hierspec bench-serve: llama-server not found (make peers builds it); skipping it",
            file=sys.stderr,
        )
    prompts = [
        [{"role": "user", "content": p.text}] for name in args.sets for p in load_prompt_set(name, n=args.n)
    ]
    from ..models.open import load_gguf_tokenizer

    tok = load_gguf_tokenizer(Path(gguf))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    targets = [t for t in default_targets(exe if "llama-server" in kinds else None) if t.kind in kinds]
    res = bench_serve(
        args.out,
        gguf,
        prompts,
        targets,
        conc,
        max_tokens=args.max_tokens,
        threads=args.threads,
        slots=args.slots,
        ctx=args.ctx,
        llama_server=exe,
        repeats=args.repeats,
        count=count,
    )
    print(write_report(res, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
