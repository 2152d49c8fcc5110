"""``hierspec serve``: flag errors before any model load, the worker choice, and the real server
(embedded SmolLM2 on llama.cpp in a subprocess) driven by the real ``openai`` client: greedy chat
equals ``hierspec generate --json``, streaming adds up, seeds repeat, bad input and a wrong key
are OpenAI errors, and SIGINT stops it with exit status 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

from hierspec.cli import main
from hierspec.methods import ModelSet
from hierspec.models import make_tiny_pair
from hierspec.serve import factory
from hierspec.serve.factory import make_worker
from hierspec.serve.serial import SerialWorker

HIERSPEC = [sys.executable, "-c", "import sys; from hierspec.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--gamma", "0"], "--gamma must be >= 1"),
        (["--port", "70000"], "--port: expected 0..65535"),
        (["--max-queue", "0"], "--max-queue must be >= 1"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--cache-ram", "-1"], "--cache-ram must be >= 0"),
        (["--api-key", " "], "--api-key is empty"),
        (["--method", "hf-ngram"], "peer for `hierspec bench`"),
        (["--method", "ssd:small"], "--method ssd is not served"),
        (["--draft-sampling", "greedy"], "--method ngram drafts without a draft model"),
    ],
)
def test_serve_bad_flags_fail_before_loading(capsys: Any, extra: list[str], msg: str) -> None:
    assert main(["serve", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and msg in err and err.startswith("hierspec: error:") and err.count("\n") == 1


def test_serve_unknown_method_is_an_argparse_error(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--method", "beam"])
    assert exc.value.code == 2


class FakeLlama:
    """Stands in for a `LlamaCppModel` (what the factory reads and how it reopens one)."""

    def __init__(
        self, path: str, *, n_ctx: int = 64, n_threads: int | None = None, n_seq_max: int = 1
    ) -> None:
        self.path, self.max_length, self.n_threads, self.n_seq_max = path, n_ctx, n_threads, n_seq_max
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeBatchWorker:
    @staticmethod
    def check_method(text: str) -> None:
        if text not in ("ar", "ngram", "suffix"):
            raise ValueError(f"method: {text!r} is not batched")

    @classmethod
    def from_llamacpp(cls, model: Any, tokenizer: Any, **kw: Any) -> FakeBatchWorker:
        worker = cls()
        worker.model, worker.kw = model, kw
        return worker


def test_make_worker_choice(monkeypatch: Any) -> None:
    target, _ = make_tiny_pair(vocab_size=32, seed=0, dtype=torch.float32)
    chosen = make_worker(ModelSet(target, None, backend="torch"))
    assert isinstance(chosen.worker, SerialWorker) and "torch backend" in chosen.why
    llama = ModelSet(FakeLlama("m.gguf", n_threads=2), None, backend="llama.cpp")  # type: ignore[arg-type]
    monkeypatch.setattr(factory, "BatchWorker", FakeBatchWorker)
    chosen = make_worker(llama, method="draft:small")  # not batched: one at a time, saying why
    assert isinstance(chosen.worker, SerialWorker) and "'draft:small' is not batched" in chosen.why
    chosen = make_worker(llama, method="suffix", gamma=2, max_batch=4)
    assert chosen.name == "FakeBatchWorker"
    model = chosen.worker.model  # reopened with one sequence per slot, same context and threads
    assert (model.path, model.n_seq_max, model.max_length, model.n_threads) == ("m.gguf", 4, 64, 2)
    assert llama.target.closed  # the one-sequence context is freed
    assert chosen.worker.kw == {
        "method": "suffix", "gamma": 2, "rule": "block", "max_queue": 64, "eos_token_id": None,
        "prefix_cache": True, "cache_bytes": 1 << 30,
    }  # fmt: skip
    assert isinstance(make_worker(llama, worker="serial").worker, SerialWorker)
    with pytest.raises(ValueError, match="--worker batch: not available"):
        make_worker(llama, method="draft:small", worker="batch")


def test_serial_worker_builds_draft_models_with_the_draft_sampling() -> None:
    """``--draft-sampling greedy`` reaches methods with a draft model; others build as before."""
    target, draft = make_tiny_pair(vocab_size=32, seed=0, dtype=torch.float32)
    models = ModelSet(target, None, backend="torch", drafts={"small": draft})
    chosen = make_worker(models, method="draft:small", gamma=3, draft_sampling="greedy")
    worker = chosen.worker
    assert isinstance(worker, SerialWorker)
    assert worker._method("draft:small", "block", 3).drafter.sampling == "greedy"
    assert worker._method("ngram", "block", 3).drafter is not None  # no draft model: built as before
    with pytest.raises(ValueError, match="draft_sampling"):
        SerialWorker(models, draft_sampling="top")


# ------------------------------------------------------------------------------ the real server
PROMPT = "Name three colours."
MAX_NEW = 32


@pytest.mark.smollm
def test_real_server_with_the_openai_client() -> None:
    pytest.importorskip("llama_cpp")
    openai = pytest.importorskip("openai")
    common = ["--backend", "llama.cpp", "--method", "ngram", "--gamma", "3"]
    server = subprocess.Popen(  # the serial worker: the batching one measures its cost curve first
        [*HIERSPEC, "serve", *common, "--port", "0", "--api-key", "sesame", "--worker", "serial"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    ref = subprocess.Popen(  # the same prompt through `generate`, while the server loads
        [
            *HIERSPEC,
            "generate",
            *common,
            "--chat",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            str(MAX_NEW),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        timer = threading.Timer(180, server.kill)  # a server that never comes up fails, never hangs
        timer.start()
        for line in server.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if "listening on" in line:
                break
        timer.cancel()
        match = re.search(r"listening on (http://\S+)", "".join(lines))
        assert match, "".join(lines)
        assert "SerialWorker" in lines[-1]
        drain = threading.Thread(target=server.stderr.read, daemon=True)  # type: ignore[union-attr]
        drain.start()
        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="sesame", max_retries=0, timeout=120)
        _talk(openai, client, match.group(1))
        out, err = ref.communicate(timeout=180)
        assert ref.returncode == 0, err
        expected = json.loads(out)["text"]
        chat = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_NEW,
            temperature=0,
        )
        assert chat.choices[0].message.content == expected
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 0
    finally:
        for proc in (server, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _talk(openai: Any, client: Any, url: str) -> None:
    """Completions, chat (whole and streamed), seeds, errors through the real client."""
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    comp = client.completions.create(
        model="smollm2-135m", prompt="def fibonacci(n):", max_tokens=16, temperature=0
    )
    assert comp.choices[0].text and comp.usage.completion_tokens <= 16 and comp.usage.prompt_tokens > 0
    assert comp.model_extra["spec_decode"]["method"] == "ngram"
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=MAX_NEW, temperature=0
    )
    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    sampled = [
        client.completions.create(
            model="smollm2-135m", prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2-135m", messages=messages, n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
