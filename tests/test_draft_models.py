"""Draft models for the embedded target: the standalone reduced-vocabulary `DraftLM` and the
`EarlyExitDraft` head on a frozen target (cache rollback, -inf outside the vocabulary, the
one-file format and each of its refusal errors). Targets are tiny random Llamas."""

from __future__ import annotations

import json
import os

import pytest
import torch

from factories import tiny_hf
from hierspec.models import (
    DraftConfig,
    DraftFileError,
    DraftLM,
    HFModel,
    LanguageModel,
    TargetIdentity,
    build_early_exit,
    load_draft,
    load_early_exit,
    target_identity,
    tokenizer_fingerprint,
)
from hierspec.models.draft import read_safetensors, write_safetensors

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 128


def _llama(seed: int = 0, dtype: torch.dtype = torch.float64, **kw: object):
    return tiny_hf(
        seed=seed,
        dtype=dtype,
        vocab_size=V,
        num_hidden_layers=4,
        rope_theta=1e5,
        tie_word_embeddings=True,
        **kw,
    )


def _vocab_map(step: int = 3) -> torch.Tensor:
    return torch.arange(0, V, step)


def _draft(dtype: torch.dtype = torch.float64, **kw: object) -> DraftLM:
    vm = _vocab_map()
    cfg = DraftConfig(vocab_size=V, n_vocab=vm.numel(), n_layer=2, d_model=32, n_head=4, max_length=128, **kw)
    return DraftLM(cfg, vm, dtype=dtype, seed=1)


class FakeTokenizer:
    """Just enough of a tokenizer for the fingerprint."""

    def __init__(self, salt: str = "") -> None:
        self.salt = salt

    def __len__(self) -> int:
        return V

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"{self.salt}t{i}" for i in ids]


def _rollback_matches(model, ids: torch.Tensor, cut: int, atol: float) -> None:
    """prefill all, crop to cut, re-feed the rest in pieces: logits equal the fresh prefill."""
    model.reset()
    full = model.forward(ids).logits
    model.crop(cut)
    assert model.cache_length == cut
    pieces = [model.forward(ids[:, cut : cut + 3]).logits]
    for t in range(cut + 3, ids.shape[1]):
        pieces.append(model.forward(ids[:, t : t + 1]).logits)
    again = torch.cat(pieces, 1)
    assert model.cache_length == ids.shape[1]
    fin = torch.isfinite(full)
    assert torch.equal(fin[:, cut:], torch.isfinite(again))
    torch.testing.assert_close(again[torch.isfinite(again)], full[:, cut:][fin[:, cut:]], atol=atol, rtol=0)


# ============================================================================ DraftLM
@pytest.mark.parametrize("kv", [None, 2])
def test_draft_is_language_model_with_exact_rollback(kv: int | None) -> None:
    model = _draft(n_kv_head=kv)
    assert isinstance(model, LanguageModel)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    _rollback_matches(model, ids, 9, atol=1e-12)
    # the cached path equals the training path (no cache)
    model.reset()
    cached = model.forward(ids).logits
    train = model.expand_logits(model.train_logits(ids)).detach()
    torch.testing.assert_close(cached, train, atol=1e-12, rtol=0)


def test_draft_logits_full_vocab_and_minus_inf_outside_map() -> None:
    model = _draft(torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])  # ids outside the map go to UNK
    out = model.forward(ids, output_hidden=True)
    assert out.logits.shape == (1, 5, V) and out.logits.dtype == torch.float32
    assert out.hidden is not None and out.hidden.shape == (1, 5, 32)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[_vocab_map()] = True
    assert torch.isneginf(out.logits[..., ~inside]).all()
    assert torch.isfinite(out.logits[..., inside]).all()
    q = torch.softmax(out.logits, -1)
    assert float(q[..., ~inside].abs().max()) == 0.0


def test_draft_dtypes_and_cache_growth() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        m = _draft(dtype)
        out = m.forward(torch.randint(0, V, (1, 4))).logits
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    vm = _vocab_map()
    m = DraftLM(
        DraftConfig(V, vm.numel(), n_layer=1, d_model=16, n_head=2, max_length=600), vm, dtype=torch.float64
    )
    ids = torch.randint(0, V, (1, 520), generator=torch.Generator().manual_seed(1))
    a = torch.cat(
        [m.forward(ids[:, :200]).logits, m.forward(ids[:, 200:400]).logits, m.forward(ids[:, 400:]).logits], 1
    )
    b = m.expand_logits(m.train_logits(ids)).detach()
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="max_length"):
        m.forward(ids[:, :100])


def test_draft_input_validation() -> None:
    m = _draft(torch.float32)
    with pytest.raises(ValueError, match="lie in"):
        m.forward(torch.tensor([[V]]))
    with pytest.raises(ValueError, match="integer"):
        m.forward(torch.zeros(1, 2))
    m.forward(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="crop length"):
        m.crop(5)
    with pytest.raises(DraftFileError, match="outside the target vocabulary"):
        DraftLM(DraftConfig(V, 2), torch.tensor([0, V]))
    with pytest.raises(DraftFileError, match="duplicate"):
        DraftLM(DraftConfig(V, 2), torch.tensor([3, 3]))


def test_draft_save_load_round_trip(tmp_path) -> None:
    m = _draft(torch.float32)
    ident = TargetIdentity(
        vocab_size=V, hidden_size=32, num_layers=4, tokenizer=tokenizer_fingerprint(FakeTokenizer())
    )
    path = tmp_path / "d.safetensors"
    m.save(path, ident, extra={"note": "x"})
    assert path.stat().st_size < 200_000
    loaded = load_draft(path, ident)
    ref = _draft(torch.float32)
    ref.load_state_dict(
        {k: (v.half().float() if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    )
    ids = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(loaded.forward(ids).logits, ref.forward(ids).logits, atol=0, rtol=0)
    assert torch.equal(loaded.vocab_map, m.vocab_map)
    assert load_draft(path, None, dtype=torch.bfloat16).dtype == torch.bfloat16
    # bf16 storage also works
    m.save(tmp_path / "b.safetensors", ident, dtype=torch.bfloat16)
    assert load_draft(tmp_path / "b.safetensors", ident).config == m.config


def test_draft_load_refuses_other_targets_and_damage(tmp_path) -> None:
    m = _draft(torch.float32)
    fp = tokenizer_fingerprint(FakeTokenizer())
    ident = TargetIdentity(vocab_size=V, tokenizer=fp)
    path = tmp_path / "d.safetensors"
    m.save(path, ident)
    with pytest.raises(DraftFileError, match="vocabulary size 128"):
        load_draft(path, TargetIdentity(vocab_size=256, tokenizer=fp))
    with pytest.raises(DraftFileError, match="another tokenizer"):
        load_draft(path, TargetIdentity(vocab_size=V, tokenizer=tokenizer_fingerprint(FakeTokenizer("x"))))
    with pytest.raises(DraftFileError, match="does not exist"):
        load_draft(tmp_path / "nope.safetensors")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DraftFileError, match="truncated or corrupt"):
        load_draft(tmp_path / "trunc.safetensors")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(DraftFileError, match="corrupt"):
        load_draft(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(DraftFileError, match="truncated or corrupt"):
        load_draft(tmp_path / "junk.safetensors")
    # a consistent file (valid sha256) whose vocab_map points outside the target vocabulary
    tensors, meta = read_safetensors(path)
    tensors["vocab_map"] = tensors["vocab_map"].clone()
    tensors["vocab_map"][-1] = V + 7
    write_safetensors(
        tmp_path / "badmap.safetensors", tensors, {k: v for k, v in meta.items() if k != "sha256"}
    )
    with pytest.raises(DraftFileError, match="outside the target vocabulary"):
        load_draft(tmp_path / "badmap.safetensors")
    # another format
    meta2 = {**{k: v for k, v in meta.items() if k != "sha256"}, "format": "hierspec.early_exit"}
    write_safetensors(tmp_path / "ee.safetensors", tensors, meta2)
    with pytest.raises(DraftFileError, match=r"not a hierspec\.draft"):
        load_draft(tmp_path / "ee.safetensors")


# ============================================================================ early exit
def test_early_exit_all_layers_tied_equals_target() -> None:
    hf = HFModel(_llama())
    ee = build_early_exit(hf, 4)  # every layer, the target's own norm and tied head
    assert isinstance(ee, LanguageModel)
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(2))
    # transformers' RMSNorm runs in float32 even for float64 weights; the head's runs in float64
    torch.testing.assert_close(ee.forward(ids).logits, hf.forward(ids).logits, atol=1e-6, rtol=0)


def test_early_exit_rollback_reduced_head_and_hidden() -> None:
    target = _llama()
    ee = build_early_exit(target, 2, vocab_map=_vocab_map(), adapter_dim=8)
    with torch.no_grad():
        ee.head.adapter_down.weight.normal_(0, 0.1)  # make the adapter matter
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(3))
    _rollback_matches(ee, ids, 8, atol=1e-12)
    ee.reset()
    out = ee.forward(ids, output_hidden=True)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[_vocab_map()] = True
    assert out.logits.shape == (2, 21, V)
    assert torch.isneginf(out.logits[..., ~inside]).all() and torch.isfinite(out.logits[..., inside]).all()
    assert out.hidden.shape == (2, 21, 32)
    # head on the target's own layer-2 hidden state (the HiSpec hook) = the draft's logits
    with torch.no_grad():
        hs = target(ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(ee.head_logits(hs), out.logits, atol=1e-10, rtol=0)
    # training path: reduced logits with grads on the head only
    red = ee.train_logits(ids)
    assert red.shape == (2, 21, _vocab_map().numel()) and red.requires_grad
    red.sum().backward()
    assert ee.head.lm_head.weight.grad is not None
    assert all(p.grad is None for p in target.parameters())


def test_early_exit_save_load_and_refusals(tmp_path) -> None:
    target = _llama(dtype=torch.float32)
    ee = build_early_exit(target, 2, vocab_map=_vocab_map(), adapter_dim=8)
    with torch.no_grad():
        ee.head.adapter_down.weight.normal_(0, 0.1)
    tok = FakeTokenizer()
    path = tmp_path / "ee.safetensors"
    ee.save(path, target_identity(target, tok))
    loaded = load_early_exit(path, HFModel(target), tokenizer=tok)
    ids = torch.randint(0, V, (1, 10))
    torch.testing.assert_close(loaded.forward(ids).logits, ee.forward(ids).logits, atol=2e-2, rtol=0)
    meta = read_safetensors(path)[1]
    assert json.loads(meta["config"])["exit_layer"] == 2
    # another tokenizer
    with pytest.raises(DraftFileError, match="another tokenizer"):
        load_early_exit(path, target, tokenizer=FakeTokenizer("other"))
    # same shapes, other weights
    with pytest.raises(DraftFileError, match="other target weights"):
        load_early_exit(path, _llama(seed=5, dtype=torch.float32))
    # a bf16 copy of the same target is accepted
    load_early_exit(path, _llama(dtype=torch.float32).to(torch.bfloat16))
    # other vocabulary / hidden size
    other = tiny_hf(vocab_size=256, num_hidden_layers=4)
    with pytest.raises(DraftFileError, match="vocabulary size"):
        load_early_exit(path, other)
    wide = tiny_hf(vocab_size=V, hidden_size=64, num_hidden_layers=4)
    with pytest.raises(DraftFileError, match="hidden_size"):
        load_early_exit(path, wide)
    raw = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-10])
    with pytest.raises(DraftFileError, match="truncated or corrupt"):
        load_early_exit(tmp_path / "t.safetensors", target)
    with pytest.raises(DraftFileError, match=r"not a hierspec\.early_exit"):
        m = _draft(torch.float32)
        m.save(tmp_path / "d.safetensors", TargetIdentity(vocab_size=V))
        load_early_exit(tmp_path / "d.safetensors", target)
    tensors, meta = read_safetensors(path)
    tensors["vocab_map"] = tensors["vocab_map"].clone()
    tensors["vocab_map"][0] = -1
    write_safetensors(tmp_path / "bad.safetensors", tensors, {k: v for k, v in meta.items() if k != "sha256"})
    with pytest.raises(DraftFileError, match="outside the target vocabulary"):
        load_early_exit(tmp_path / "bad.safetensors", target)
