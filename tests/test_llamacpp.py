"""`LlamaCppModel` on the shipped SmolLM2-135M Q4_1 GGUF: the LanguageModel contract, the engine on
this backend (greedy identity, chi² at T > 0 with a negative control) and bad input.

Rounding (measured with llama-cpp-python 0.3.36, 1 and 2 threads, AVX-512 Xeon, 2026-12-01): with
flash attention (llama.cpp's "auto", on for this model) a row of a T-token forward and the same row
of T one-token forwards are bitwise equal for T <= 48 (max abs difference 0.0 over 6 prompts x up
to 35 rows and random ids up to 48 rows). From T = 64 llama.cpp switches kernels and rows differ by
up to ~1.3 in the logits; with flash_attn=False they differ by up to ~1.2 already at T = 12.
`ROW_TOL` leaves room for other builds and hosts; greedy speculative decoding (verify forwards of
<= 9 rows) can then part from plain greedy decoding only at a near-tie, which is what
`test_greedy_identity_ngram` asserts (measured identity: 4 / 4 prompts x 24 tokens here, 6 / 6 x 32
in a wider run).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

pytest.importorskip("llama_cpp")

from hierspec.drafters import NgramDrafter
from hierspec.engine import generate
from hierspec.models.base import ForwardOutput, LanguageModel
from hierspec.models.llamacpp import LlamaCppModel, check_gguf_file
from hierspec.models.smollm2 import smollm2_path
from hierspec.sampling import SamplingParams, process_logits

ROW_TOL = 1e-3  # logits, batched vs single-row forwards (measured 0.0, see module docstring)
# SmolLM2 token ids (llama.cpp's tokenizer): a ChatML request, "The capital of France is Paris. The
# capital of France is", "1, 2, 3, 4, 5, 6,", three Python functions (ends in "def mul(a, b):")
PROMPTS = [
    [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],
    [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4649, 314],
    [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28, 216, 37, 28, 216, 38, 28],
    [1604, 803, 24, 81, 28, 278, 727, 472, 1003, 253, 1232, 278, 198, 198, 1604, 840, 24, 81, 28, 278,
     727, 472, 1003, 253, 731, 278, 198, 198, 1604, 14907, 24, 81, 28, 278, 727],
]  # fmt: skip


@pytest.fixture(scope="module")
def path():
    try:
        return smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def model(path):
    m = LlamaCppModel(path, n_ctx=256, n_threads=1)
    yield m
    m.close()


def prefill(model, ids):
    model.reset()
    return model.forward(torch.tensor([ids])).logits


# ------------------------------------------------------------------------------ the contract
def test_properties_and_metadata(model, path):
    assert isinstance(model, LanguageModel)
    assert model.vocab_size == 49152 and model.max_length == 256 and model.threads == 1
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.backend == "llama.cpp" and model.path == path
    assert model.architecture == "llama" and model.ftype == "Q4_1"
    assert (model.token_bos, model.token_eos) == (1, 2)
    assert "<|im_start|>" in (model.chat_template or "")
    assert path.name in model.describe() and "Q4_1" in model.describe()
    assert not hasattr(model, "forward_tree") and not hasattr(model, "compact")


def test_forward_shapes_and_cache_length(model):
    model.reset()
    assert model.cache_length == 0
    out = model.forward(torch.tensor([PROMPTS[0]]))
    assert isinstance(out, ForwardOutput) and out.hidden is None
    assert out.logits.shape == (1, len(PROMPTS[0]), 49152) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert model.cache_length == len(PROMPTS[0])
    model.forward(torch.tensor([[5, 6, 7]]))
    assert model.cache_length == len(PROMPTS[0]) + 3
    model.crop(4)
    assert model.cache_length == 4
    model.crop(4)  # no-op
    model.reset()
    assert model.cache_length == 0


def test_crop_then_forward_equals_fresh_prefill(model):
    seq = PROMPTS[1] + PROMPTS[2]
    ref = prefill(model, seq)[0]  # [L, V]
    for keep in (len(seq) - 1, 15, 3, 1):
        model.reset()
        model.forward(torch.tensor([seq]))
        model.forward(torch.tensor([[17, 18, 19]]))  # garbage to roll back
        model.crop(keep)
        assert model.cache_length == keep
        rest = model.forward(torch.tensor([seq[keep:]])).logits[0]
        assert (rest - ref[keep:]).abs().max() < ROW_TOL, keep
    model.reset()


def test_rows_equal_single_token_forwards(model):
    seq = PROMPTS[3]
    batched = prefill(model, seq)[0]
    model.reset()
    single = torch.cat([model.forward(torch.tensor([[t]])).logits[0] for t in seq])
    diff = float((batched - single).abs().max())
    assert diff < ROW_TOL, diff
    assert torch.equal(batched.argmax(-1), single.argmax(-1))
    model.reset()


def test_prefill_without_logits(model):
    seq = PROMPTS[1]
    ref = prefill(model, seq)[0, -1]
    model.reset()
    model.prefill(torch.tensor([seq[:-1]]))
    assert model.cache_length == len(seq) - 1
    last = model.forward(torch.tensor([seq[-1:]])).logits[0, -1]
    assert (last - ref).abs().max() < ROW_TOL
    model.reset()


def test_hidden_states(model):
    seq = PROMPTS[2]
    plain = prefill(model, seq)
    model.reset()
    out = model.forward(torch.tensor([seq]), output_hidden=True)
    assert out.hidden is not None and out.hidden.shape == (1, len(seq), model.hidden_size)
    assert torch.isfinite(out.hidden).all() and out.hidden.abs().sum() > 0
    assert (out.logits - plain).abs().max() < ROW_TOL
    model.reset()
    single = torch.cat([model.forward(torch.tensor([[t]]), output_hidden=True).hidden[0] for t in seq])
    assert (single - out.hidden[0]).abs().max() < ROW_TOL
    assert model.forward(torch.tensor([[5]])).hidden is None  # and off again
    model.reset()


def test_forward_bad_input_leaves_cache(model):
    model.reset()
    model.forward(torch.tensor([[1, 2, 3]]))
    bad_ids = [[[1, 49152]], [[-1]], [[1.0]], [[1, 2], [3, 4]], [[]], [[0] * 300]]
    for bad in bad_ids:
        with pytest.raises(ValueError, match=r"input_ids|max_length"):
            model.forward(torch.tensor(bad))
    assert model.cache_length == 3
    for bad in (4, -1, 1.5):
        with pytest.raises(ValueError, match="crop"):
            model.crop(bad)
    model.reset()


# ------------------------------------------------------------------------------ the engine
def test_greedy_identity_ngram(model):
    """n-gram speculation (verify forwards of up to 6 rows) against plain greedy decoding
    (1-row forwards) on the same backend. Where they part, the plain row must be a near-tie
    (top-2 gap < 2 * ROW_TOL): the only thing batched rounding can change."""
    greedy = SamplingParams(temperature=0)
    same = 0
    for prompt in PROMPTS:
        ref = generate(model, prompt, params=greedy, max_new_tokens=24).token_ids
        out = generate(model, prompt, drafter=NgramDrafter(), gamma=5, params=greedy, max_new_tokens=24)
        if out.token_ids == ref:
            same += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref, strict=True)) if a != b)
        row = prefill(model, prompt + ref[:j])[0, -1]
        top = row.max()
        assert top - row[out.token_ids[j]] < 2 * ROW_TOL and top - row[ref[j]] < 2 * ROW_TOL
    print(f"greedy identity, n-gram vs plain on llama.cpp: {same} / {len(PROMPTS)} prompts")
    model.reset()


class AcceptAll:
    """Negative control: a target whose verification accepts every draft token (row t of a
    multi-token forward is forced onto draft token t+1)."""

    def __init__(self, inner):
        self.inner = inner
        self.vocab_size, self.max_length = inner.vocab_size, inner.max_length
        self.device, self.dtype = inner.device, inner.dtype

    cache_length = property(lambda self: self.inner.cache_length)

    def forward(self, ids, *, output_hidden=False):
        out = self.inner.forward(ids)
        if ids.shape[1] > 1:
            t = torch.arange(ids.shape[1] - 1)
            out.logits[0, t, ids[0, 1:]] = 1e4
        return out

    def crop(self, n):
        self.inner.crop(n)

    def reset(self):
        self.inner.reset()


# " cat dog cat": the n-gram drafts " dog" (p = 0.054 at T = 1: mostly rejected, so the residual
# rule is exercised); a 3-token prompt keeps each generate() call at about three small forwards
CHI2_PROMPT = [2644, 2767, 2644]
CHI2_N = 200


def exact_two_token_bins(model, prompt, params, n):
    """Probabilities of the first two generated tokens (a, b), binned so that every bin is expected
    >= 5 times in n draws: frequent pairs (a, b), the rest of each frequent first token (a, None),
    and everything else (None, None). Computed from the backend's own logits."""
    p1 = process_logits(prefill(model, prompt)[0, -1:].double(), params)[0]
    bins = {}
    for a in torch.nonzero(p1 * n >= 5).flatten().tolist():
        p2 = process_logits(prefill(model, [*prompt, a])[0, -1:].double(), params)[0]
        pairs = torch.nonzero(p1[a] * p2 * n >= 5).flatten().tolist()
        bins.update({(a, b): float(p1[a] * p2[b]) for b in pairs})
        bins[(a, None)] = float(p1[a] * (1.0 - p2[pairs].sum()))
    bins[(None, None)] = 1.0 - sum(bins.values())
    model.reset()
    return bins


def chi2_two_tokens(target, model, params, seed):
    """Pearson chi² p-value of the engine's first two tokens (n-gram drafts, token rule) against
    the exact target law; and the number of bins."""
    bins = exact_two_token_bins(model, CHI2_PROMPT, params, CHI2_N)
    counts = dict.fromkeys(bins, 0)
    for i in range(CHI2_N):
        out = generate(target, CHI2_PROMPT, drafter=NgramDrafter(), gamma=3, params=params,
                       max_new_tokens=2, seed=seed + i)  # fmt: skip
        a, b = out.token_ids
        key = (a, b) if (a, b) in bins else (a, None) if (a, None) in bins else (None, None)
        counts[key] += 1
    exp = np.array(list(bins.values())) * CHI2_N
    return chisquare(np.array(list(counts.values())), exp).pvalue, len(bins)


CHI2_PARAMS = [
    SamplingParams(temperature=1.0),
    pytest.param(SamplingParams(temperature=0.8, top_k=20), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("params", CHI2_PARAMS)
def test_engine_chi2_first_two_tokens(model, params):
    p, n_bins = chi2_two_tokens(model, model, params, seed=10_000)
    print(f"chi2 {params.describe()}: p = {p:.3g} over {n_bins} bins")
    assert n_bins >= 3
    assert p > 1e-3, p


def test_engine_chi2_negative_control(model):
    p, _ = chi2_two_tokens(AcceptAll(model), model, SamplingParams(temperature=1.0), seed=10_000)
    print(f"chi2 negative control (accept every draft token): p = {p:.3g}")
    assert p < 1e-6, p


# ------------------------------------------------------------------------------ bad input
def test_bad_files(tmp_path, path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        LlamaCppModel(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="not a file"):
        LlamaCppModel(tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(ValueError, match=r"notes\.gguf.*not a GGUF"):
        LlamaCppModel(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf"):
        LlamaCppModel(empty)
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as src, open(cut, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        LlamaCppModel(cut)
    assert check_gguf_file(path) == path


def test_bad_arguments(path, capfd):
    with pytest.raises(ValueError, match="n_ctx=100000"):
        LlamaCppModel(path, n_ctx=100_000)
    for kw in ({"n_ctx": 0}, {"n_threads": -1}, {"n_batch": True}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            LlamaCppModel(path, **kw)
    m = LlamaCppModel(path, n_threads=1)
    assert m.max_length == min(m.n_ctx_train, 4096)
    m.close()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # llama.cpp's log stays quiet


def test_unknown_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    fake = tmp_path / "fake.gguf"
    writer = gguf.GGUFWriter(str(fake), "notanarch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"fake\.gguf.*unknown model architecture.*notanarch"):
        LlamaCppModel(fake)
