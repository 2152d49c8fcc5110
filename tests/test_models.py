"""Tests of the model adapters: cache rollback exactness, input validation, SmolLM2 (marked)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from factories import tiny_hf
from hierspec.models import (
    ForwardOutput,
    HFModel,
    LanguageModel,
    TinyGPT,
    TinyGPTConfig,
    make_tiny_pair,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- model factories
def _tiny64() -> TinyGPT:
    return TinyGPT(TinyGPTConfig(vocab_size=16, max_length=128, seed=3), dtype=torch.float64)


def _tiny32() -> TinyGPT:
    return TinyGPT(TinyGPTConfig(vocab_size=16, max_length=128, seed=3), dtype=torch.float32)


def _hf_llama(dtype: torch.dtype = torch.float64, **extra: object) -> HFModel:
    return HFModel(tiny_hf(seed=0, dtype=dtype, **extra))


def _hf_llama32() -> HFModel:
    return _hf_llama(torch.float32)


def _hf_gpt2() -> HFModel:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return HFModel(transformers.GPT2LMHeadModel(config).to(torch.float64))


def _hf_mistral_sliding() -> HFModel:
    """Sliding window 5 < sequence length: checks the window is applied over absolute positions."""
    return HFModel(tiny_hf("Mistral", seed=2, dtype=torch.float64, sliding_window=5))


FACTORIES = {
    "tiny64": (_tiny64, 1e-10),
    "tiny32": (_tiny32, 1e-5),
    "llama64": (_hf_llama, 1e-10),
    "llama32": (_hf_llama32, 1e-5),
    "gpt2_64": (_hf_gpt2, 1e-10),
    "mistral_sliding64": (_hf_mistral_sliding, 1e-10),
}


def _prefill_logits(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    model.reset()
    return model.forward(tokens).logits


# ---------------------------------------------------------------------------- (a) rollback
@pytest.mark.parametrize("name", list(FACTORIES))
def test_rollback_matches_fresh_prefill(name: str) -> None:
    """Speculative-decoding pattern: forward 1+K, crop to the accepted length, go on.

    After every step the logits of the last forward at the committed positions equal the logits
    of a fresh prefill of the committed tokens, and the next step continues from the crop.
    """
    factory, atol = FACTORIES[name]
    model = factory()
    fresh = factory()  # a second instance for the reference prefills
    assert isinstance(model, LanguageModel)
    gen = torch.Generator().manual_seed(7)
    vocab, batch = model.vocab_size, 2
    committed = torch.randint(0, vocab, (batch, 5), generator=gen)
    out = model.forward(committed)
    assert model.cache_length == 5
    torch.testing.assert_close(out.logits, _prefill_logits(fresh, committed), atol=atol, rtol=0)

    for step in range(30):
        if model.cache_length > model.max_length - 10:
            break
        k = int(torch.randint(1, 6, (1,), generator=gen))
        block = torch.randint(0, vocab, (batch, 1 + k), generator=gen)
        start = model.cache_length
        out = model.forward(block)
        assert out.logits.shape == (batch, 1 + k, vocab)
        assert model.cache_length == start + 1 + k
        accepted = int(torch.randint(0, k + 1, (1,), generator=gen))  # keep 1 + accepted tokens
        model.crop(start + 1 + accepted)
        committed = torch.cat([committed, block[:, : 1 + accepted]], dim=1)
        assert model.cache_length == committed.shape[1]
        ref = _prefill_logits(fresh, committed)
        torch.testing.assert_close(out.logits[:, : 1 + accepted], ref[:, start:], atol=atol, rtol=0)
        if isinstance(model, HFModel):
            assert model.cache.get_seq_length() == model.cache_length
        if step % 5 == 4:  # now and then roll back past the last block (an engine may re-draft)
            back = model.cache_length - int(torch.randint(1, 4, (1,), generator=gen))
            model.crop(back)
            committed = committed[:, :back]
    assert committed.shape[1] > 20

    # a single-token forward after all that still matches
    nxt = torch.randint(0, vocab, (batch, 1), generator=gen)
    out = model.forward(nxt)
    ref = _prefill_logits(fresh, torch.cat([committed, nxt], dim=1))
    torch.testing.assert_close(out.logits[:, 0], ref[:, -1], atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["tiny64", "llama64", "gpt2_64"])
def test_crop_to_zero_and_reset(name: str) -> None:
    factory, atol = FACTORIES[name]
    model = factory()
    ids = torch.randint(0, model.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    first = model.forward(ids).logits
    model.crop(0)
    assert model.cache_length == 0
    torch.testing.assert_close(model.forward(ids).logits, first, atol=atol, rtol=0)
    model.reset()
    assert model.cache_length == 0
    model.forward(ids[:, :4])
    model.crop(4)  # no-op crop
    assert model.cache_length == 4
    torch.testing.assert_close(model.forward(ids[:, 4:]).logits, first[:, 4:], atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["tiny64", "llama64", "gpt2_64"])
def test_hidden_states_are_final_norm(name: str) -> None:
    """output_hidden returns the states the LM head reads (after the final norm)."""
    factory, atol = FACTORIES[name]
    model = factory()
    ids = torch.randint(0, model.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    out = model.forward(ids, output_hidden=True)
    assert isinstance(out, ForwardOutput)
    assert out.hidden is not None and out.hidden.shape[:2] == (1, 6)
    if isinstance(model, TinyGPT):
        head = model.lm_head(out.hidden) * model.config.logit_scale
    else:
        head = model.model.get_output_embeddings()(out.hidden)
    torch.testing.assert_close(head, out.logits, atol=atol, rtol=0)
    assert model.forward(ids[:, :1]).hidden is None


def test_logits_dtype_and_in_place_edit() -> None:
    """float64 -> float64, float32 -> float32, bf16 -> float32; logits are editable tensors."""
    assert _hf_llama(torch.float64).forward(torch.tensor([[1, 2]])).logits.dtype == torch.float64
    model32 = _hf_llama(torch.float32)
    logits = model32.forward(torch.tensor([[1, 2]])).logits
    assert logits.dtype == torch.float32
    logits[..., 0] = float("-inf")  # would raise on an inference tensor
    bf16 = _hf_llama(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.forward(torch.tensor([[1, 2]])).logits.dtype == torch.float32
    assert _tiny32().forward(torch.tensor([[1]])).logits.dtype == torch.float32


def test_protocol_attributes() -> None:
    for model in (_tiny64(), _hf_llama(), _hf_gpt2()):
        assert isinstance(model, LanguageModel)
        assert model.max_length == 128
        assert model.device == torch.device("cpu")
    assert _hf_llama().vocab_size == 64
    assert _tiny64().vocab_size == 16
    assert HFModel(_hf_llama().model, max_length=32).max_length == 32


def test_batch_size_fixed_until_reset() -> None:
    for model in (_tiny64(), _hf_llama()):
        model.forward(torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="batch"):
            model.forward(torch.zeros(3, 1, dtype=torch.long))
        model.reset()
        out = model.forward(torch.zeros(3, 2, dtype=torch.long))
        assert out.logits.shape[0] == 3


# ---------------------------------------------------------------------------- tiny specifics
def test_tiny_distributions_non_degenerate() -> None:
    model = TinyGPT(TinyGPTConfig(vocab_size=16, seed=0), dtype=torch.float64)
    ids = torch.randint(0, 16, (4, 32), generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(model.forward(ids).logits, dim=-1)
    top = probs.max(dim=-1).values
    assert 1 / 16 + 0.05 < top.mean() < 0.95  # neither uniform nor one-hot
    assert probs.min() > 0
    # context dependence: the same last token in different contexts gives different rows
    assert (probs[:, 1:] - probs[:, :-1]).abs().max() > 0.1
    sharp = TinyGPT(TinyGPTConfig(vocab_size=16, seed=0, logit_scale=8.0), dtype=torch.float64)
    top_sharp = torch.softmax(sharp.forward(ids).logits, dim=-1).max(dim=-1).values
    assert top_sharp.mean() > top.mean()


def test_tiny_deterministic_and_dtype_consistent() -> None:
    a = TinyGPT(TinyGPTConfig(seed=5), dtype=torch.float64)
    b = TinyGPT(TinyGPTConfig(seed=5), dtype=torch.float64)
    c = TinyGPT(TinyGPTConfig(seed=5), dtype=torch.float32)
    d = TinyGPT(TinyGPTConfig(seed=6), dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4]])
    la, lb, lc, ld = (m.forward(ids).logits for m in (a, b, c, d))
    assert torch.equal(la, lb)
    torch.testing.assert_close(lc.double(), la, atol=1e-4, rtol=0)
    assert not torch.allclose(la, ld)


def test_make_tiny_pair() -> None:
    for related in (True, False):
        target, draft = make_tiny_pair(vocab_size=12, seed=1, related=related)
        assert target.vocab_size == draft.vocab_size == 12
        assert target.dtype == draft.dtype == torch.float64
        assert target.config != draft.config
        ids = torch.randint(0, 12, (1, 20), generator=torch.Generator().manual_seed(0))
        p = torch.softmax(target.forward(ids).logits, -1)
        q = torch.softmax(draft.forward(ids).logits, -1)
        overlap = torch.minimum(p, q).sum(-1).mean()
        assert 0.05 < overlap < 0.95
        assert not torch.allclose(p, q)


# ---------------------------------------------------------------------------- (b) bad input
@pytest.mark.parametrize("name", ["tiny64", "llama64"])
def test_bad_inputs_raise(name: str) -> None:
    model = FACTORIES[name][0]()
    vocab = model.vocab_size
    with pytest.raises(ValueError, match="integer"):
        model.forward(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="integer"):
        model.forward(torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.forward(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        model.forward(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        model.forward(torch.tensor([[0, vocab]]))
    with pytest.raises(ValueError, match="lie in"):
        model.forward(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="max_length"):
        model.forward(torch.zeros(1, model.max_length + 1, dtype=torch.long))
    assert model.cache_length == 0  # failed forwards leave the cache untouched
    model.forward(torch.zeros(1, model.max_length - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        model.forward(torch.zeros(1, 2, dtype=torch.long))
    model.forward(torch.zeros(1, 1, dtype=torch.int32))  # exactly full is fine; int32 accepted
    assert model.cache_length == model.max_length
    with pytest.raises(ValueError, match="cannot crop"):
        model.crop(model.max_length + 1)
    with pytest.raises(ValueError, match=">= 0"):
        model.crop(-1)
    with pytest.raises(ValueError, match="int"):
        model.crop(2.0)  # type: ignore[arg-type]
    assert model.cache_length == model.max_length


def test_hf_failed_forward_rolls_back() -> None:
    """An exception inside the model leaves the cache at its previous length."""
    model = _hf_llama()
    model.forward(torch.tensor([[1, 2, 3]]))
    layer = model.model.model.layers[1]
    original = layer.forward

    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("boom")

    layer.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        model.forward(torch.tensor([[4, 5]]))
    layer.forward = original
    assert model.cache_length == 3
    assert all(lay.get_seq_length() == 3 for lay in model.cache.layers)
    out = model.forward(torch.tensor([[4, 5]]))
    ref = _hf_llama().forward(torch.tensor([[1, 2, 3, 4, 5]])).logits[:, 3:]
    torch.testing.assert_close(out.logits, ref, atol=1e-10, rtol=0)


def test_hf_max_length_argument_validated() -> None:
    model = _hf_llama().model
    with pytest.raises(ValueError, match="max_length"):
        HFModel(model, max_length=129)
    with pytest.raises(ValueError, match="max_length"):
        HFModel(model, max_length=0)


# ---------------------------------------------------------------------------- (c) SmolLM2
@pytest.mark.smollm
def test_smollm2_greedy_matches_generate(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from hierspec.models import smollm2

    try:
        smollm2.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path))

    t0 = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    first = time.perf_counter() - t0
    cached = smollm2.smollm2_cache_path()
    assert cached.is_dir() and (cached / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    assert model.vocab_size == 49152 and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    n_new = 8
    # forward/crop greedy decoding, with a throw-away extra token each step (crop removes it)
    logits = model.forward(ids).logits[:, -1]
    tokens: list[int] = []
    for _ in range(n_new):
        nxt = int(logits.argmax(-1))
        tokens.append(nxt)
        length = model.cache_length
        out = model.forward(torch.tensor([[nxt, 0]]))
        model.crop(length + 1)
        logits = out.logits[:, 0]
    ref = model.model.generate(ids, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new)
    assert tokens == ref[0, ids.shape[1] :].tolist()
    assert "paris" in tokenizer.decode(tokens).lower()

    t0 = time.perf_counter()
    model2, tokenizer2 = smollm2.load_smollm2()
    second = time.perf_counter() - t0
    assert second < first, (first, second)
    prompt = tokenizer2.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    out2 = model2.forward(ids).logits
    model.reset()
    torch.testing.assert_close(out2, model.forward(ids).logits, atol=0, rtol=0)
    print(f"SmolLM2 load: GGUF {first:.1f} s, cached {second:.1f} s")
    shutil.rmtree(cached, ignore_errors=True)  # 0.5 GB: do not leave it in pytest's tmp dirs


def test_protocol_capabilities_need_only_the_documented_methods() -> None:
    """A backend written from the protocol's list (no cost method) is recognised as a
    PrefillModel / TreeModel when it has prefill / forward_tree + compact."""
    from hierspec.models.base import PrefillModel, TreeModel

    class Minimal:
        vocab_size, max_length = 8, 16
        device, dtype, cache_length = torch.device("cpu"), torch.float32, 0

        def forward(self, input_ids, *, output_hidden=False): ...

        def crop(self, length): ...

        def reset(self): ...

    class WithPrefill(Minimal):
        def prefill(self, input_ids): ...

    class WithTree(Minimal):
        def forward_tree(self, input_ids, parents, *, output_hidden=False): ...

        def compact(self, start, keep): ...

    assert isinstance(Minimal(), LanguageModel) and not isinstance(Minimal(), PrefillModel)
    assert isinstance(WithPrefill(), PrefillModel)
    assert isinstance(WithTree(), TreeModel)
