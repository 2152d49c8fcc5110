"""The OpenAI-compatible app (`hierspec.serve.app`) over a tiny model and `SerialWorker`:
responses equal the library's output, streams add up to the whole text, every bad input is one
OpenAI error object naming the field, a client that goes away cancels its request, metrics add up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

import httpx
from fastapi.testclient import TestClient

from hierspec.methods import ModelSet, build_method
from hierspec.models import make_tiny_pair
from hierspec.sampling import SamplingParams
from hierspec.serve.app import ServeDefaults, create_app
from hierspec.serve.serial import SerialWorker
from hierspec.serve.text import TextStream, final_text
from hierspec.serve.worker import DoneEvent, GenRequest, QueueFull, TokenEvent
from hierspec.stats import SpecStats

CONTEXT = 128
VOCAB = 64


class CharTok:
    """A character tokenizer over the tiny vocabulary: ids >= 3 are letters, 2 is EOS."""

    eos_token_id = 2

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % 61 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = "" if skip_special_tokens else "<s>"
        return "".join(chr(ord("a") + (i - 3) % 26) if i >= 3 else special for i in ids)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool, tokenize: bool
    ) -> list[int]:
        text = "".join(f"{m['role']}:{m['content']};" for m in messages)
        return self(text + ("assistant:" if add_generation_prompt else ""))["input_ids"]


def _target() -> Any:
    return make_tiny_pair(vocab_size=VOCAB, seed=1, dtype=torch.float32, max_length=CONTEXT)[0]


@pytest.fixture(scope="module")
def worker() -> Iterator[SerialWorker]:
    w = SerialWorker(ModelSet(_target(), CharTok(), backend="torch"), gamma=3, max_queue=8)
    w.start()
    yield w
    w.shutdown(5)


@pytest.fixture(scope="module")
def client(worker: SerialWorker) -> TestClient:
    app = create_app(
        worker, CharTok(), "tiny", context_length=CONTEXT, vocab_size=VOCAB, defaults=ServeDefaults(gamma=3)
    )
    return TestClient(app)  # no lifespan: the module's worker outlives each app


def _library(ids: list[int], max_new: int, temperature: float = 0.0, seed: int | None = 0, **kw: Any) -> Any:
    """What the library itself generates (a second copy of the same tiny target)."""
    built = build_method("ngram", ModelSet(_target(), CharTok(), backend="torch"), rule="block", gamma=3)
    return built.generate(
        ids,
        params=SamplingParams(temperature=temperature),
        max_new_tokens=max_new,
        eos_token_id=2,
        tokenizer=CharTok(),
        seed=seed,
        **kw,
    )


def _events(text: str) -> list[Any]:
    """The data of each SSE event ("[DONE]" as is)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _streamed_text(events: list[Any], chat: bool) -> str:
    key = (lambda c: c["delta"].get("content") or "") if chat else (lambda c: c["text"])
    return "".join(key(c) for e in events if e != "[DONE]" for c in e["choices"])


# ------------------------------------------------------------------------------ happy paths
def test_models_and_health(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["worker"]["worker"] == "SerialWorker" and health.json()["context_length"] == CONTEXT


def test_completion_equals_the_library(client: TestClient) -> None:
    prompt = "hello world"
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ref = _library(CharTok()(prompt)["input_ids"], 24)
    assert body["choices"][0]["text"] == final_text(CharTok(), ref.token_ids, [])[0]
    assert body["choices"][0]["finish_reason"] == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason)
    n = len(prompt)
    assert body["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": len(ref.token_ids),
        "total_tokens": n + len(ref.token_ids),
    }
    spec = body["spec_decode"]
    assert spec["num_drafts"] == ref.stats.num_spec_steps and spec["rule"] == "greedy" and spec["gamma"] == 3
    assert set(spec) >= {
        "num_draft_tokens",
        "num_accepted_tokens",
        "accepted_per_position",
        "mean_acceptance_length",
        "draft_acceptance_rate",
    }
    # the same prompt as token ids
    ids = CharTok()(prompt)["input_ids"]
    again = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 24, "temperature": 0}).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


def test_chat_goes_through_the_template(client: TestClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 16, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    ids = CharTok().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], True, True
    )
    ref = _library(ids, 16)
    assert body["choices"][0]["message"]["content"] == final_text(CharTok(), ref.token_ids, [])[0]
    assert body["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("chat", [False, True])
def test_stream_adds_up_to_the_whole_response(client: TestClient, chat: bool) -> None:
    if chat:
        url, base = "/v1/chat/completions", {"messages": [{"role": "user", "content": "tell"}]}
    else:
        url, base = "/v1/completions", {"prompt": "once upon"}
    base = {**base, "max_tokens": 30, "temperature": 0.8, "seed": 5}
    whole = client.post(url, json=base).json()
    r = client.post(url, json={**base, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    usage, last = events[-2], events[-3]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["spec_decode"] == whole["spec_decode"]
    assert all(e["usage"] is None for e in events[:-2])
    text = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
    assert _streamed_text(events, chat) == text  # same seed: same text, streamed or not
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_string_is_cut_and_not_returned(client: TestClient) -> None:
    base = {"prompt": "hello world", "max_tokens": 40, "temperature": 0}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(full) >= 14, full  # no early EOS for this prompt
    stop = full[10:12]
    expected = full[: full.index(stop)]
    r = client.post("/v1/completions", json={**base, "stop": [stop, "zzzzzz"]}).json()
    assert r["choices"][0]["text"] == expected and r["choices"][0]["finish_reason"] == "stop"
    events = _events(client.post("/v1/completions", json={**base, "stop": stop, "stream": True}).text)
    assert _streamed_text(events, False) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_seed_method_gamma_rule_are_used(client: TestClient) -> None:
    body = {"prompt": "xyz", "max_tokens": 20, "temperature": 1.0, "seed": 11, "method": "suffix", "gamma": 2}
    a = client.post("/v1/completions", json={**body, "rule": "token"}).json()
    b = client.post("/v1/completions", json={**body, "rule": "token"}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert (a["spec_decode"]["method"], a["spec_decode"]["gamma"], a["spec_decode"]["rule"]) == (
        "suffix",
        2,
        "token",
    )


# ------------------------------------------------------------------------------ refusals
BAD = [
    ("c", b'{"prompt": "x",', 400, None),  # malformed JSON
    ("c", b"[1, 2]", 400, None),  # not an object
    ("c", {}, 400, "prompt"),  # missing
    ("c", {"prompt": "x", "foo": 1}, 400, "foo"),  # unknown field
    ("c", {"prompt": "x", "temperature": "0.5"}, 400, "temperature"),  # wrongly typed
    ("c", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("c", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("c", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("c", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("c", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("c", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + max_tokens > context
    ("c", {"prompt": "x" * CONTEXT}, 400, "prompt"),  # the prompt alone fills the context
    ("c", {"prompt": ""}, 400, "prompt"),
    ("c", {"prompt": [1, VOCAB]}, 400, "prompt"),  # outside the vocabulary
    ("c", {"prompt": ["a", "b"]}, 400, "prompt"),  # a batch of prompts
    ("c", {"prompt": "x", "method": "beam"}, 400, "method"),  # unknown method
    ("c", {"prompt": "x", "method": "hf-ngram"}, 400, "method"),  # a bench peer
    ("c", {"prompt": "x", "method": "ssd:small"}, 400, "method"),
    ("c", {"prompt": "x", "gamma": 0}, 400, "gamma"),
    ("c", {"prompt": "x", "gamma": "fast"}, 400, "gamma"),
    ("c", {"prompt": "x", "gamma": 2.5}, 400, "gamma"),
    ("c", {"prompt": "x", "rule": "exact"}, 400, "rule"),
    ("c", {"prompt": "x", "n": 2}, 400, "n"),
    ("c", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("c", {"prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ("c", {"prompt": "x", "echo": True}, 400, "echo"),
    ("c", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("c", {"prompt": "x", "stop": ""}, 400, "stop"),
    ("c", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("c", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("c", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("c", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("c", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("m", {"messages": []}, 400, "messages"),
    ("m", {"messages": [{"role": "user"}], "logprobs": True}, 400, "logprobs"),
    ("m", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    (
        "m",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        400,
        "response_format.type",
    ),
    (
        "m",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    (
        "m",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CONTEXT},
        400,
        "max_completion_tokens",
    ),
    ("m", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    (
        "m",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
]


@pytest.mark.parametrize("where,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_openai_error_naming_the_field(
    client: TestClient, where: str, body: Any, status: int, param: str | None
) -> None:
    url = "/v1/completions" if where == "c" else "/v1/chat/completions"
    if isinstance(body, bytes):
        r = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    if param is not None:
        assert err["message"].startswith(param.split("[")[0].split(".")[0])


def test_harmless_openai_fields_are_accepted(client: TestClient) -> None:
    body = {
        "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y", "name": "me"}],
        "max_tokens": 4, "n": 1, "user": "u", "logprobs": False, "frequency_penalty": 0,
        "presence_penalty": 0,
        "stream": False, "stream_options": None, "metadata": {"k": "v"}, "store": False, "top_k": -1,
        "response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": True,
        "seed": 3, "top_p": 0.9, "min_p": 0.05, "stop": ["q"],
    }  # fmt: skip
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_method_not_runnable_on_the_backend_is_a_400(worker: SerialWorker) -> None:
    app = create_app(worker, CharTok(), "tiny", context_length=CONTEXT, backend="llama.cpp")
    r = TestClient(app).post("/v1/completions", json={"prompt": "x", "method": "hispec"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "method"
    assert "llama.cpp" in r.json()["error"]["message"]


def test_api_key(worker: SerialWorker) -> None:
    c = TestClient(create_app(worker, CharTok(), "tiny", context_length=CONTEXT, api_key="sesame"))
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        r = c.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models").status_code == 401
    assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_unknown_route_is_an_openai_error(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------ fake workers
class FakeWorker:
    """Scripted: ``tokens`` token events ``gap_s`` apart, then ``finish`` (or the error); records
    submits and cancels; ``full``: QueueFull on submit."""

    max_queue = 1

    def __init__(
        self,
        tokens: int = 3,
        gap_s: float = 0.0,
        finish: str = "length",
        error: str | None = None,
        full: bool = False,
    ) -> None:
        self.tokens, self.gap_s, self.finish, self.error, self.full = tokens, gap_s, finish, error, full
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.cancel_seen = threading.Event()
        self.shut = False

    def start(self) -> None:
        pass

    def submit(self, request: GenRequest, sink: Any) -> None:
        if self.full:
            raise QueueFull("the queue is full (1 requests waiting)")
        self.submitted.append(request.request_id)
        threading.Thread(target=self._run, args=(request, sink), daemon=True).start()

    def _run(self, request: GenRequest, sink: Any) -> None:
        done: list[int] = []
        for i in range(self.tokens):
            if request.request_id in self.cancelled:
                sink(DoneEvent(request.request_id, done, "cancelled", SpecStats()))
                return
            time.sleep(self.gap_s)
            done.append(3 + i % 20)
            sink(TokenEvent(request.request_id, [done[-1]]))
        stats = SpecStats(
            num_generated_tokens=len(done), num_spec_steps=1, num_draft_tokens=2, num_accepted_draft_tokens=1
        )
        stats.accepted_per_position = [1, 0]
        sink(DoneEvent(request.request_id, done, "error" if self.error else self.finish, stats, self.error))

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.cancel_seen.set()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.shut = True

    def status(self) -> dict[str, Any]:
        return {"queued": 0, "running": 0}


def _fake_client(worker: FakeWorker, **kw: Any) -> TestClient:
    return TestClient(create_app(worker, CharTok(), "tiny", context_length=CONTEXT, **kw))


def test_queue_full_is_429_at_once() -> None:
    c = _fake_client(FakeWorker(full=True))
    t0 = time.perf_counter()
    r = c.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 429 and time.perf_counter() - t0 < 2
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    assert 'hierspec_requests_total{finish_reason="rejected",model_name="tiny"} 1.0' in c.get("/metrics").text


@pytest.mark.parametrize("stream", [False, True])
def test_worker_error_is_500_with_its_message(stream: bool) -> None:
    c = _fake_client(FakeWorker(tokens=0, error="RuntimeError: the model fell over"))
    r = c.post("/v1/completions", json={"prompt": "x", "stream": stream})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "the model fell over" in err["message"]


def test_error_mid_stream_is_an_error_event_then_done() -> None:
    c = _fake_client(FakeWorker(tokens=2, error="RuntimeError: boom"))
    events = _events(c.post("/v1/completions", json={"prompt": "x", "stream": True}).text)
    assert events[-1] == "[DONE]" and "boom" in events[-2]["error"]["message"]


def test_lifespan_shuts_the_worker_down() -> None:
    w = FakeWorker()
    with _fake_client(w) as c:
        assert c.get("/health").status_code == 200
    assert w.shut


@contextmanager
def _serving(app: Any) -> Iterator[str]:
    """The app on a real uvicorn server in a thread (TestClient cannot drop a connection)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_client_gone_cancels_the_request() -> None:
    """A stream closed after its first chunk, and a whole-response client that gives up: the
    worker is told to cancel each at once."""
    w = FakeWorker(tokens=400, gap_s=0.02)
    app = create_app(w, CharTok(), "tiny", context_length=CONTEXT, defaults=ServeDefaults(poll_s=0.05))
    with _serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
        assert w.cancel_seen.wait(5), "the worker was not told"
        assert w.cancelled == w.submitted[:1]
        w.cancel_seen.clear()
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "x"}, timeout=0.5)
        assert w.cancel_seen.wait(5) and w.cancelled == w.submitted[:2]
        metrics = http.get("/metrics").text
        assert 'hierspec_requests_total{finish_reason="cancelled",model_name="tiny"} 2.0' in metrics


def test_metrics_count_what_was_served() -> None:
    c = _fake_client(FakeWorker(tokens=4))
    for _ in range(2):
        assert c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4}).status_code == 200
    text = c.get("/metrics").text
    for line in (
        'vllm:spec_decode_num_drafts_total{model_name="tiny"} 2.0',
        'vllm:spec_decode_num_draft_tokens_total{model_name="tiny"} 4.0',
        'vllm:spec_decode_num_accepted_tokens_total{model_name="tiny"} 2.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"} 2.0',
        'vllm:request_success_total{finished_reason="length",model_name="tiny"} 2.0',
        'vllm:prompt_tokens_total{model_name="tiny"} 6.0',
        'vllm:generation_tokens_total{model_name="tiny"} 8.0',
        'vllm:time_to_first_token_seconds_count{model_name="tiny"} 2.0',
        'vllm:inter_token_latency_seconds_count{model_name="tiny"} 6.0',
        'vllm:num_requests_waiting{model_name="tiny"} 0.0',
    ):
        assert line in text, line
    assert "_created" not in text


# ------------------------------------------------------------------------------ the serial worker
def _collect() -> tuple[list[Any], threading.Event, Any]:
    events: list[Any] = []
    done = threading.Event()

    def sink(ev: Any) -> None:
        events.append(ev)
        if isinstance(ev, DoneEvent):
            done.set()

    return events, done, sink


def _request(rid: str, **kw: Any) -> GenRequest:
    return GenRequest(rid, [3, 4, 5], SamplingParams(temperature=0), kw.pop("max_tokens", 8), **kw)


def test_serial_worker_error_cancel_and_queue(worker: SerialWorker) -> None:
    # an error (a draft that does not exist) is one DoneEvent, and the thread serves on
    events, done, sink = _collect()
    worker.submit(_request("bad", method="draft:/nonexistent.gguf"), sink)
    assert done.wait(30)
    assert events[-1].finish_reason == "error" and "\n" not in events[-1].error
    events, done, sink = _collect()
    worker.submit(_request("ok", max_tokens=5), sink)
    assert (
        done.wait(30)
        and events[-1].finish_reason in ("length", "eos")
        and events[-1].stats.num_generated_tokens
    )
    assert [t for e in events[:-1] for t in e.token_ids] == events[-1].token_ids
    # a cancel while decoding: "cancelled" after the step in progress
    events, done, sink = _collect()

    def cancelling(ev: Any) -> None:
        sink(ev)
        if isinstance(ev, TokenEvent):
            worker.cancel("long")

    worker.submit(_request("long", max_tokens=100), cancelling)
    assert done.wait(30) and events[-1].finish_reason == "cancelled"
    assert len(events[-1].token_ids) < 100


def test_serial_worker_queue_is_bounded() -> None:
    w = SerialWorker(ModelSet(_target(), CharTok(), backend="torch"), gamma=2, max_queue=1, warmup=False)
    events, _, sink = _collect()
    w.submit(_request("a"), sink)  # not started: it waits in the queue
    with pytest.raises(QueueFull):
        w.submit(_request("b"), sink)
    w.cancel("a")  # a queued request is dropped at once
    assert [(e.request_id, e.finish_reason) for e in events] == [("a", "cancelled")]
    assert w.status()["queued"] == 0
    w.shutdown(1)
    with pytest.raises(QueueFull):
        w.submit(_request("c"), sink)


# ------------------------------------------------------------------------------ text
class ByteTok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_prefixes() -> None:
    data = "ab é€ cd STOP ef".encode()
    s = TextStream(ByteTok(), ["STOP"])
    pieces = [s.push([b]) for b in data]
    pieces.append(s.finish())
    assert "".join(pieces) == "ab é€ cd " and not any("\ufffd" in p for p in pieces)
    assert s.stopped
    plain = TextStream(ByteTok())
    assert "".join(plain.push([b]) for b in "é€".encode()) + plain.finish() == "é€"


class MetaspaceTok:
    """A SentencePiece-style tokenizer (a token decoded at the start of a text loses its space)."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.tk = Tokenizer(models.BPE(unk_token="<unk>"))
        self.tk.pre_tokenizer, self.tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        corpus = ["hello world and the other world", "the quick brown fox jumps over the lazy dog"]
        self.tk.train_from_iterator(
            corpus * 20, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _streamed(tok, ids: list[int], seed: int) -> str:
    import random

    rng, s, pieces, i = random.Random(seed), TextStream(tok), [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(s.push(ids[i : i + n]))
        i += n
    return "".join(pieces) + s.finish()


def test_text_stream_window_equals_the_whole_decode(monkeypatch) -> None:
    """Pieces of 1-3 tokens streamed through the decoding window add up to the whole decode, for
    SmolLM2's byte-level BPE (characters split across tokens) and a SentencePiece-style tokenizer
    (leading spaces); a deliberately windowless variant (each push decoded alone) fails the latter."""
    from hierspec.models.catalog import resolve_model
    from hierspec.models.open import load_gguf_tokenizer

    smol = load_gguf_tokenizer(resolve_model("smollm2-135m").path)
    text = "Grüße aus Köln — 東京の天気は晴れ 🌞!\n  def f(x):\n\treturn x ** 2  # ok ✓"
    meta = MetaspaceTok()
    cases = [
        (smol, smol.encode(text, add_special_tokens=False)),
        (meta, meta.encode("hello world the lazy dog")),
    ]
    for tok, ids in cases:
        for seed in range(5):
            assert _streamed(tok, ids, seed) == tok.decode(ids, skip_special_tokens=True)
    real = TextStream.push

    def windowless(self, token_ids):
        self._prefix = self._read = len(self.token_ids)  # forget the window: decode the push alone
        return real(self, token_ids)

    monkeypatch.setattr(TextStream, "push", windowless)
    tok, ids = cases[1]
    assert any(_streamed(tok, ids, seed) != tok.decode(ids) for seed in range(5))
