"""`hierspec.hf`: hierspec's decoding inside transformers' ``generate(custom_generate=...)``.

Greedy identity with ``model.generate`` (fp32, every engine method family, both forms: callable
and folder), the law at T = 1 (chi² of the first two new tokens against transformers' own
processed softmax, with a wrong-temperature negative control), the warper mapping on random
logits, streaming, stopping as transformers stops, and bad input (transformers' own errors where
transformers rejects, one line naming the argument where the bridge does).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from factories import tiny_hf
from test_engine import chi2_p
from test_hispec import tiny_llama

transformers = pytest.importorskip("transformers")

import hierspec.hf as hh  # noqa: E402
from hierspec.methods import MethodError  # noqa: E402
from hierspec.sampling import process_logits  # noqa: E402

PROMPT = [5, 9, 3, 5, 9, 3, 5, 9]
NEW = 24


@pytest.fixture(scope="module")
def target():
    return tiny_hf("Llama", seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def twin():
    """A draft with the target's weights: every draft token is accepted at T = 0."""
    return tiny_hf("Llama", seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def other():
    """A draft with other weights: most draft tokens are rejected."""
    return tiny_hf("Llama", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer for the 64-token tiny vocabulary: token i < 63 is the word ``t{i}``,
    63 is ``abcdef`` (the probe transformers' stop-string matcher tokenizes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({**{f"t{i}": i for i in range(63)}, "abcdef": 63}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def ids_of(prompt=PROMPT):
    return torch.tensor([prompt])


def plain(model, ids=None, **kw):
    """transformers' own decoding (greedy unless kw says otherwise)."""
    ids = ids_of() if ids is None else ids
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **kw}
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def bridged(model, ids=None, **kw):
    return plain(model, ids, custom_generate=hh.generate, **kw)


# ----------------------------------------------------------------------------- greedy identity
@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    """Untrained early-exit heads at layers 1 and 2 of the target, as files."""
    from hierspec.models import build_early_exit, save_early_exit

    where = tmp_path_factory.mktemp("heads")
    paths = {}
    for layer in (1, 2):
        paths[layer] = str(where / f"exit{layer}.safetensors")
        save_early_exit(build_early_exit(target, layer), paths[layer])
    return paths


@pytest.mark.parametrize(
    "method,draft",
    [
        ("ar", None),
        ("ngram", None),
        ("suffix", None),
        ("draft", "twin"),
        ("draft", "other"),
        ("default", "twin"),
        ("default", None),
        ("hierarchy:ngram+assistant@2", "other"),
        ("hierarchy:suffix+assistant@2", "twin"),
        ("early-exit:1=HEAD1", None),
        ("hispec:1=HEAD1/2=HEAD2", None),
    ],
)
def test_greedy_identity(target, twin, other, heads, method, draft):
    """Every method family that runs through the engine gives transformers' greedy tokens."""
    method = method.replace("HEAD1", heads[1]).replace("HEAD2", heads[2])
    assistant = {"twin": twin, "other": other, None: None}[draft]
    ref = plain(target)
    out = bridged(target, method=method, gamma=3, assistant_model=assistant)
    assert torch.equal(out, ref)
    assert out.hierspec_stats.num_generated_tokens == ref.shape[1] - len(PROMPT)
    if draft == "twin":
        assert out.hierspec_stats.mean_acceptance_length > 2.5  # the draft is the target: accepted


def test_greedy_identity_gamma_auto_and_repeat(target, monkeypatch, tmp_path):
    """gamma auto (the adaptive policy over a measured cost curve) and a second call (the built
    method is cached on the model) give the same tokens."""
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path))
    ref = plain(target)
    for _ in range(2):
        assert torch.equal(bridged(target, method="suffix", gamma="auto"), ref)


def test_direct_call_and_return_dict(target):
    """Called directly (not through generate) it goes through transformers' preparation too;
    return_dict_in_generate gives transformers' output class with the stats on it."""
    ref = plain(target)
    out = hh.generate(
        target,
        ids_of(),
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        method="ngram",
        gamma=4,
        return_dict_in_generate=True,
    )
    assert type(out).__name__ == "GenerateDecoderOnlyOutput"
    assert torch.equal(out.sequences, ref) and list(out.keys()) == ["sequences"]
    assert out.hierspec_method == "ngram" and out.hierspec_stats.num_spec_steps > 0


def test_left_padding_is_dropped(target):
    """A left-padded prompt with its attention mask decodes as the unpadded prompt."""
    ids = torch.tensor([[0, 0, *PROMPT]])
    mask = torch.tensor([[0, 0] + [1] * len(PROMPT)])
    out = target.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        custom_generate=hh.generate,
        method="ngram",
        gamma=3,
    )
    assert torch.equal(out[:, :2], ids[:, :2]) and torch.equal(out[:, 2:], plain(target))


# ----------------------------------------------------------------------------- the folder form
def test_folder_layout_and_load(target, twin):
    """The folder has transformers' layout, its requirements hold here, and it loads with
    trust_remote_code=True, no network (assistant and streamer reach it); without it
    transformers refuses as it does for any folder."""
    from pathlib import Path

    from transformers.dynamic_module_utils import check_python_requirements

    root = Path(hh.CUSTOM_GENERATE_DIR)
    assert (root / "custom_generate" / "generate.py").is_file()
    assert (root / "custom_generate" / "requirements.txt").is_file()
    check_python_requirements(str(root), requirements_file="custom_generate/requirements.txt")
    ref = plain(target)
    out = plain(
        target,
        custom_generate=hh.CUSTOM_GENERATE_DIR,
        trust_remote_code=True,
        method="suffix",
        gamma=2,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref) and out.hierspec_method == "suffix"
    rec = Recorder()
    out = plain(
        target,
        custom_generate=hh.CUSTOM_GENERATE_DIR,
        trust_remote_code=True,
        method="draft",
        assistant_model=twin,
        streamer=rec,
        gamma=3,
    )
    assert torch.equal(out, ref) and out.hierspec_stats.mean_acceptance_length > 2.5
    assert rec.puts[0] == PROMPT and [t for p in rec.puts[1:] for t in p] == ref[0, len(PROMPT) :].tolist()
    with pytest.raises(ValueError, match="trust_remote_code"):
        plain(target, custom_generate=hh.CUSTOM_GENERATE_DIR, trust_remote_code=False)


# ----------------------------------------------------------------------------- the law
def warped(logits, processors):
    """transformers' processed distribution: its warpers on the logits, then softmax."""
    return torch.softmax(processors(None, logits.clone()), dim=-1)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0, "top_k": 0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.8},
        {"temperature": 0.9, "top_k": 12, "top_p": 0.95, "min_p": 0.05},
    ],
)
def test_sampling_params_equal_transformers_warpers(target, kw):
    """The warpers transformers prepares from its arguments map onto SamplingParams whose
    processing equals transformers' own, on random logits."""
    config, _ = target._prepare_generation_config(None, do_sample=True, **kw)
    processors = target._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=1,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=None,
        device="cpu",
    )
    params = hh.sampling_params(processors, greedy=False)
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(process_logits(logits, params), warped(logits, processors), atol=1e-6, rtol=0)


N_CHI2 = 500


def exact_two(model, prompt, temperature):
    """transformers' law of the first two new tokens at ``temperature`` (no top-k/p): [V, V]."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    with torch.no_grad():
        v = model.config.vocab_size
        first = warped(model(torch.tensor([prompt])).logits[:, -1].double(), procs)[0]
        seconds = torch.tensor([[*prompt, y] for y in range(v)])
        second = warped(model(seconds).logits[:, -1].double(), procs)
    return (first[:, None] * second).numpy()


def sample_two(model, assistant, prompt, temperature, n):
    counts = np.zeros((model.config.vocab_size,) * 2)
    ids = torch.tensor([prompt])
    for i in range(n):
        out = model.generate(
            ids,
            max_new_tokens=2,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            pad_token_id=0,
            eos_token_id=None,
            custom_generate=hh.generate,
            method="draft",
            assistant_model=assistant,
            rule="block",
            gamma=2,
            seed=i,
        )
        counts[tuple(out[0, len(prompt) :].tolist())] += 1
    return counts


def test_chi2_t1_against_transformers_law():
    """T = 1: the first two tokens of draft-model speculation through the bridge follow
    transformers' sampling law (exact softmax of the model's logits); the same run at a wrong
    temperature (0.5) is rejected against that law (negative control)."""
    model = tiny_llama(vocab=6, seed=3, scale=8.0, layers=2)
    draft = tiny_llama(vocab=6, seed=4, scale=8.0, layers=1)
    prompt = [1, 3, 1, 3]
    law = exact_two(model, prompt, 1.0)
    assert chi2_p(sample_two(model, draft, prompt, 1.0, N_CHI2), law) > 1e-3
    assert chi2_p(sample_two(model, draft, prompt, 0.5, N_CHI2 // 3), law) < 1e-6


# ----------------------------------------------------------------------------- streaming, stopping
class Recorder:
    """A streamer that records what it receives (transformers' put/end protocol)."""

    def __init__(self, fail_at: int | None = None):
        self.puts: list[list[int]] = []
        self.ends = 0
        self.fail_at = fail_at

    def put(self, value):
        if self.fail_at is not None and len(self.puts) == self.fail_at:
            raise RuntimeError("streamer failed on purpose")
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


def test_streamer_receives_the_output(target, tokenizer):
    """As with transformers: the prompt first, then every new token once, then end(); a text
    streamer's text is the returned text."""
    rec = Recorder()
    out = bridged(target, method="ngram", gamma=4, streamer=rec)
    assert rec.puts[0] == PROMPT and rec.ends == 1
    assert [t for put in rec.puts[1:] for t in put] == out[0, len(PROMPT) :].tolist()
    assert len(rec.puts) < 1 + NEW  # steps of several tokens are streamed as they are committed
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = bridged(target, method="suffix", gamma=3, streamer=streamer)
    assert "".join(streamer).strip() == tokenizer.decode(out[0, len(PROMPT) :]).strip()


def test_streamer_that_raises(target):
    """The streamer's exception propagates as it is; nothing is returned, and the next call is
    unaffected."""
    rec = Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="streamer failed on purpose"):
        bridged(target, method="ngram", gamma=3, streamer=rec)
    assert rec.ends == 0 and len(rec.puts) == 2
    assert torch.equal(bridged(target, method="ngram", gamma=3), plain(target))


def test_stopping_as_transformers(target, tokenizer):
    """eos_token_id lists, stop strings and custom criteria stop where transformers' own loop
    stops, also inside a speculative step of several tokens."""
    new = plain(target, eos_token_id=None)[0, len(PROMPT) :].tolist()
    stop_tok = new[len(new) // 2]
    cases = [
        {"eos_token_id": [62, stop_tok]},
        {
            "stopping_criteria": transformers.StoppingCriteriaList([AtLength(len(PROMPT) + 7)]),
            "eos_token_id": None,
        },
    ]
    for kw in cases:
        ref = plain(target, **kw)
        assert ref.shape[1] < len(PROMPT) + NEW
        for method in ("ngram", "suffix"):
            assert torch.equal(bridged(target, method=method, gamma=5, **kw), ref), (kw, method)
    # stop strings: the folder form and a direct call (transformers 5.23 drops tokenizer= before
    # it calls a custom_generate callable, and then refuses stop strings itself)
    kw = {"stop_strings": [f"t{stop_tok}"], "tokenizer": tokenizer, "eos_token_id": None}
    ref = plain(target, **kw)
    assert ref.shape[1] < len(PROMPT) + NEW
    folder = plain(
        target, custom_generate=hh.CUSTOM_GENERATE_DIR, trust_remote_code=True, method="ngram", gamma=5, **kw
    )
    direct = hh.generate(
        target, ids_of(), max_new_tokens=NEW, do_sample=False, pad_token_id=0, method="suffix", gamma=5, **kw
    )
    assert torch.equal(folder, ref) and torch.equal(direct, ref)
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        bridged(target, method="ngram", **kw)
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        hh.generate(target, ids_of(), max_new_tokens=4, stop_strings=["t1"])


class AtLength(transformers.StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw",
    [
        {"foo": 1},
        {"do_sample": True, "temperature": -1.0},
        {"do_sample": True, "top_p": -0.5},
        {"do_sample": True, "min_p": 2.0},
        {"max_new_tokens": 0},
        {"do_sample": True, "top_k": -2},
    ],
)
def test_rejected_as_transformers_rejects(target, kw):
    """What transformers rejects, the bridge rejects with the same error and wording."""
    with pytest.raises(Exception) as theirs:
        plain(target, **kw)
    with pytest.raises(Exception) as ours:
        bridged(target, method="ngram", **kw)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ids": [[1, 2], [3, 4]]}, "batch_size = 1"),
        ({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"),
        ({"num_beams": 2}, "num_beams"),
        ({"output_scores": True, "return_dict_in_generate": True}, "output_scores"),
        ({"method": "bogus"}, "unknown method"),
        ({"method": "ssd:small"}, "its own loop"),
        ({"method": "draft"}, "pass assistant_model"),
        ({"method": "ngram", "assistant": True}, "assistant_model: method 'ngram' does not use it"),
        ({"gamma": 0}, "gamma: expected"),
        ({"gamma": "fast"}, "gamma: expected"),
        ({"rule": "nope"}, "rule: expected one of"),
        ({"draft_sampling": "top"}, "draft_sampling: expected"),
        ({"draft_sampling": "greedy"}, "applies to methods with a draft"),
        ({"method": "draft", "assistant": "vocab"}, "vocabulary"),
    ],
)
def test_bad_input_names_the_argument(target, other, kw, match):
    kw = dict(kw)
    ids = torch.tensor(kw.pop("ids")) if "ids" in kw else None
    which = kw.pop("assistant", None)
    if which is True:
        kw["assistant_model"] = other
    elif which == "vocab":
        kw["assistant_model"] = tiny_hf("Llama", seed=2, vocab_size=32)
    kw.setdefault("method", "ngram")
    with pytest.raises(ValueError, match=match) as err:
        bridged(target, ids, **kw)
    assert "\n" not in str(err.value)
    if match in ("unknown method", "vocabulary"):
        assert isinstance(err.value, MethodError)


def test_draft_sampling_reaches_the_drafter(target, other):
    """``draft_sampling="greedy"`` builds the assistant's drafter greedy; the output stays the
    target's greedy text (T = 0) and the two choices are cached apart."""
    from hierspec.hf import _SESSION_ATTR

    want = plain(target)
    for sampling in ("greedy", "sample"):
        got = bridged(target, method="draft", assistant_model=other, gamma=3, draft_sampling=sampling)
        assert torch.equal(got, want)
    built = {key[3]: b for key, (_, b) in target.__dict__[_SESSION_ATTR][1].items() if key[0].kind == "draft"}
    assert {k: b.drafter.sampling for k, b in built.items() if k in ("greedy", "sample")} == {
        "greedy": "greedy", "sample": "sample"
    }  # fmt: skip


# ----------------------------------------------------------------------------- the bench module
def test_bench_twin_equals_the_draft():
    """transformers_twin: the same logits as the DraftLM (-inf outside its vocab_map)."""
    from hierspec.models.draft import DraftConfig, DraftLM
    from hierspec.models.draft.twin import transformers_twin

    cfg = DraftConfig(vocab_size=64, n_vocab=20, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_length=64)
    draft = DraftLM(cfg, torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20], seed=1)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    a, b = draft.forward(ids).logits, transformers_twin(draft)(ids).logits
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    torch.testing.assert_close(a[~torch.isinf(a)], b[~torch.isinf(b)], atol=1e-5, rtol=1e-5)


def test_bench_summary_and_help():
    from hierspec.bench.hf_bridge import _cells, summarise, table

    cells = _cells(["draft"], [0], [0])
    rows = [
        {
            "temperature": 0.0,
            "repeat": r,
            "prompt": 0,
            "cell": c["name"],
            "new_tokens": 10,
            "time_s": s,
            "token_ids": [1, 2],
            "tau": 2.0 if c["kind"] == "hierspec" else None,
        }
        for r in range(2)
        for c, s in zip(cells, (1.0, 0.5, 0.25), strict=True)
    ]
    summary = summarise(rows, cells, [0.0])
    by = {s["cell"]: s for s in summary}
    assert by["draft/γauto"]["vs_hf"] == pytest.approx(4.0) and by["draft/γauto"]["vs_hf_assisted_best"] == 2
    assert by["hf"]["identical"] == 2 and "**2.00x**" in table(summary)
    res = subprocess.run(
        [sys.executable, "-m", "hierspec.bench.hf_bridge", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "--hf-gammas" in res.stdout
