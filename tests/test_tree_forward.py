"""Tree attention for the target's verification forward: `forward_tree` + `compact`.

(a) every node's logits/hidden equal a chain forward of its root-to-node path on the prefix;
(b) compaction to an accepted path equals a fresh prefill (and forward/crop keep working);
(c) negative controls: a causal mask or chain positions break (a) by a wide margin;
(d) bad input raises ValueError naming the argument; plus unit tests of the mask helpers.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import hierspec.models.hf as hf_module
import hierspec.models.tiny as tiny_module
from factories import tiny_hf
from hierspec.models import HFModel
from hierspec.models.treemask import (
    ancestor_mask,
    check_parents,
    path_to,
    tree_attention_mask,
    tree_depths,
)
from test_models import _hf_gpt2, _hf_llama, _hf_mistral_sliding, _tiny64

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# initializer_range 0.2 (default 0.02) gives the random Llama peaked attention and logits of std ~1,
# so a wrong mask or wrong positions change the logits by ~2 (with 0.02, positions barely matter).
SHARP = 0.2


def _llama64() -> HFModel:
    return _hf_llama(torch.float64, initializer_range=SHARP)


def _llama32() -> HFModel:
    return _hf_llama(torch.float32, initializer_range=SHARP)


def _llama16() -> HFModel:
    return _hf_llama(torch.bfloat16, initializer_range=SHARP)


def _llama64_eager() -> HFModel:
    return _hf_llama(torch.float64, initializer_range=SHARP, attn_implementation="eager")


def _qwen2_mixed64() -> HFModel:
    """Per-layer types (a sliding layer, window 5, and a full layer): takes a dict of masks."""
    return HFModel(
        tiny_hf(
            "Qwen2",
            seed=3,
            dtype=torch.float64,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            initializer_range=SHARP,
        )
    )


# name -> (factory, atol). Eager attention runs its softmax in float32 even for float64 models.
FACTORIES = {
    "tiny64": (_tiny64, 1e-10),
    "llama64": (_llama64, 1e-10),
    "llama32": (_llama32, 1e-4),
    "llama64_eager": (_llama64_eager, 1e-5),
    "mistral_sliding64": (_hf_mistral_sliding, 1e-10),  # window 5 < prefix + depth: it binds
    "gpt2_64": (_hf_gpt2, 1e-10),
    "qwen2_mixed64": (_qwen2_mixed64, 1e-10),
}


def _random_tree(n: int, seed: int, span: int | None = None) -> list[int]:
    """parents[i] uniform in [0, i) (or in [i - span, i) for a deep tree)."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1]
    for i in range(1, n):
        lo = 0 if span is None else max(0, i - span)
        parents.append(int(torch.randint(lo, i, (1,), generator=gen)))
    return parents


TREES = {
    "root_only": [-1],
    "chain": [-1, 0, 1, 2, 3, 4],
    "star": [-1, 0, 0, 0, 0, 0, 0, 0],
    # 0 -> {1, 2, 4}; 1 -> 3 -> {5, 6}; 5 -> 8; 2 -> 7: depth 4 down one branch only
    "unbalanced4": [-1, 0, 0, 1, 0, 3, 3, 2, 5],
    "random20": _random_tree(20, seed=1),
    "deep20": _random_tree(20, seed=2, span=3),
}
UNBALANCED4_DEPTHS = [0, 1, 1, 2, 1, 3, 3, 2, 4]


def _naive_ancestors(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def _leaves(parents: list[int]) -> list[int]:
    has_child = set(parents[1:])
    return [i for i in range(len(parents)) if i not in has_child]


def _tree_errors(
    model, ref, parents: list[int], *, prefix_len: int = 7, seed: int = 0
) -> tuple[float, float]:
    """Max |tree - chain| over all nodes, for logits and hidden states.

    ``model`` runs prefix + forward_tree; ``ref`` (same weights) runs the prefix once and then, per
    leaf, crop(prefix) + a chain forward of the root-to-leaf path, which covers every node.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(parents)
    prefix = torch.randint(0, model.vocab_size, (1, prefix_len), generator=gen)
    tokens = torch.randint(0, model.vocab_size, (1, n), generator=gen)
    model.reset()
    model.forward(prefix)
    out = model.forward_tree(tokens, parents, output_hidden=True)
    assert model.cache_length == prefix_len + n
    assert out.logits.shape == (1, n, model.vocab_size)
    assert out.hidden is not None and out.hidden.shape[:2] == (1, n)
    assert out.logits.dtype == (torch.float64 if model.dtype == torch.float64 else torch.float32)
    ref.reset()
    ref.forward(prefix)
    ref_logits = torch.full_like(out.logits, float("nan"))
    ref_hidden = torch.full_like(out.hidden, float("nan"))
    for leaf in _leaves(parents):
        path = path_to(parents, leaf)
        ref.crop(prefix_len)
        chain = ref.forward(tokens[:, path], output_hidden=True)
        ref_logits[0, path] = chain.logits[0].to(ref_logits.dtype)
        ref_hidden[0, path] = chain.hidden[0].to(ref_hidden.dtype)
    assert not ref_logits.isnan().any()  # every node lies on some root-to-leaf path
    logit_err = (out.logits - ref_logits).abs().max().item()
    hidden_err = (out.hidden - ref_hidden).abs().max().item()
    return logit_err, hidden_err


# ---------------------------------------------------------------------------- mask helpers
@pytest.mark.parametrize("tree", list(TREES))
def test_mask_helpers_match_naive(tree: str) -> None:
    parents = TREES[tree]
    n = len(parents)
    naive = _naive_ancestors(parents)
    assert torch.equal(ancestor_mask(parents), naive)
    assert torch.equal(ancestor_mask(torch.tensor(parents)), naive)
    assert torch.equal(tree_depths(parents), naive.sum(1) - 1)
    full = tree_attention_mask(parents, 3)
    assert full.shape == (n, 3 + n) and full.dtype == torch.bool
    assert full[:, :3].all() and torch.equal(full[:, 3:], naive)
    for node in range(n):
        path = path_to(parents, node)
        assert path[0] == 0 and path[-1] == node
        assert all(parents[b] == a for a, b in itertools.pairwise(path))
        assert len(path) - 1 == int(tree_depths(parents)[node])


def test_mask_helpers_hand_checked() -> None:
    parents = TREES["unbalanced4"]
    assert tree_depths(parents).tolist() == UNBALANCED4_DEPTHS
    assert path_to(parents, 8) == [0, 1, 3, 5, 8]
    assert path_to(parents, 0) == [0]
    assert ancestor_mask(parents)[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert ancestor_mask(TREES["star"]).sum().item() == 8 + 7  # self + root for each non-root
    assert tree_attention_mask([-1], 0).tolist() == [[True]]


# ---------------------------------------------------------------------------- (a) tree == chains
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("name", ["tiny64", "llama64", "llama32"])
def test_tree_nodes_match_chain_forward(name: str, tree: str) -> None:
    factory, atol = FACTORIES[name]
    logit_err, hidden_err = _tree_errors(factory(), factory(), TREES[tree])
    assert logit_err <= atol, logit_err
    assert hidden_err <= 10 * atol, hidden_err


@pytest.mark.parametrize("name", ["llama64_eager", "mistral_sliding64", "gpt2_64", "qwen2_mixed64"])
def test_tree_nodes_match_chain_other_models(name: str) -> None:
    """Eager (additive float mask), a binding sliding window (all layers / per layer type),
    learned absolute positions."""
    factory, atol = FACTORIES[name]
    for tree in ("unbalanced4", "random20"):
        logit_err, hidden_err = _tree_errors(factory(), factory(), TREES[tree])
        assert logit_err <= atol and hidden_err <= 10 * atol, (tree, logit_err, hidden_err)


def test_tree_bfloat16() -> None:
    """bf16 runs (float32 logits) and agrees with bf16 chain forwards up to bf16 rounding."""
    logit_err, hidden_err = _tree_errors(_llama16(), _llama16(), TREES["random20"])
    assert logit_err < 0.1 and hidden_err < 0.1, (logit_err, hidden_err)


# ---------------------------------------------------------------------------- (b) compaction
@pytest.mark.parametrize("name", ["tiny64", "llama64", "llama32", "mistral_sliding64"])
def test_compact_matches_fresh_prefill(name: str) -> None:
    """Rounds of forward_tree + compact(start, path) to a random node; after each, a forward of
    more tokens equals a fresh prefill of prefix + accepted path + more; crop still works."""
    factory, atol = FACTORIES[name]
    model, fresh = factory(), factory()
    gen = torch.Generator().manual_seed(11)
    vocab = model.vocab_size
    committed = torch.randint(0, vocab, (1, 6), generator=gen)
    model.forward(committed)
    for round_ in range(4):
        parents = _random_tree(12, seed=100 + round_, span=None if round_ % 2 else 3)
        tokens = torch.randint(0, vocab, (1, len(parents)), generator=gen)
        start = model.cache_length
        model.forward_tree(tokens, parents)
        assert model.cache_length == start + len(parents)
        node = int(torch.randint(0, len(parents), (1,), generator=gen))
        path = path_to(parents, node)
        model.compact(start, path)
        assert model.cache_length == start + len(path)
        if isinstance(model, HFModel):
            assert all(layer.get_seq_length() == model.cache_length for layer in model.cache.layers)
        committed = torch.cat([committed, tokens[:, path]], 1)
        more = torch.randint(0, vocab, (1, 3), generator=gen)
        out = model.forward(more)
        fresh.reset()
        ref = fresh.forward(torch.cat([committed, more], 1)).logits[:, -3:]
        torch.testing.assert_close(out.logits, ref, atol=atol, rtol=0)
        model.crop(committed.shape[1])  # drop `more` again: crop after compaction
    # crop into the compacted region, then continue
    model.crop(9)
    more = torch.randint(0, vocab, (1, 4), generator=gen)
    out = model.forward(more)
    fresh.reset()
    ref = fresh.forward(torch.cat([committed[:, :9], more], 1)).logits[:, -4:]
    torch.testing.assert_close(out.logits, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["tiny64", "llama64"])
def test_compact_edge_cases(name: str) -> None:
    """keep == [0..m-1] is a crop, empty keep crops to start, start == 0 rewrites from the start."""
    factory, atol = FACTORIES[name]
    model, fresh = factory(), factory()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model.forward(ids)
    model.compact(2, [0, 1, 2])
    assert model.cache_length == 5
    model.compact(3, [])
    assert model.cache_length == 3
    model.compact(0, [0, 2])  # keeps tokens 1 and 3: positions are wrong for 3, but indices move
    assert model.cache_length == 2
    model.reset()
    model.forward(ids[:, :3])
    model.forward_tree(torch.tensor([[4, 9, 5]]), [-1, 0, 0])
    model.compact(3, [0, 2])  # accept 4 -> 5
    out = model.forward(torch.tensor([[6]]))
    fresh.reset()
    ref = fresh.forward(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[:, -1:]
    torch.testing.assert_close(out.logits, ref, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- (c) negative controls
def _causal_mask(parents, past: int) -> torch.Tensor:
    n = len(parents)
    return tree_attention_mask([-1, *range(n - 1)], past)


def _chain_depths(parents) -> torch.Tensor:
    return torch.arange(len(parents))


@pytest.mark.parametrize("name", ["tiny64", "llama64", "llama32"])
@pytest.mark.parametrize("broken", ["causal_mask", "chain_positions"])
def test_negative_control_wrong_mask_or_positions(name: str, broken: str, monkeypatch) -> None:
    """A plain causal mask or chain positions make the tree disagree with the chain forwards by
    at least 100x the tolerance of (a) (so (a) can fail)."""
    factory, atol = FACTORIES[name]
    model = factory()
    module = hf_module if isinstance(model, HFModel) else tiny_module
    if broken == "causal_mask":
        monkeypatch.setattr(module, "tree_attention_mask", _causal_mask)
    else:
        monkeypatch.setattr(module, "tree_depths", _chain_depths)
    logit_err, _ = _tree_errors(model, factory(), TREES["unbalanced4"])
    assert logit_err > max(100 * atol, 0.1), logit_err  # logits have std ~1


# ---------------------------------------------------------------------------- (d) bad input
@pytest.mark.parametrize(
    "parents,msg",
    [
        ([0, 0, 1], r"parents\[0\] == -1"),
        ([-1, 1, 0], r"0 <= parents\[i\] < i"),
        ([-1, 0, 2], r"0 <= parents\[i\] < i"),
        ([-1, 0, -1], r"0 <= parents\[i\] < i"),
        ([[-1, 0, 1]], r"parents: expected shape \[N\]"),
        (torch.tensor([-1.0, 0.0, 1.0]), "integer entries"),
        ([-1, 0], "N = 3"),
        (["a", "b", "c"], "parents: expected a 1-D sequence"),
    ],
)
@pytest.mark.parametrize("name", ["tiny64", "llama64"])
def test_bad_parents_raise(name: str, parents, msg: str) -> None:
    model = FACTORIES[name][0]()
    model.forward(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=msg):
        model.forward_tree(torch.tensor([[3, 4, 5]]), parents)
    assert model.cache_length == 2


def test_check_parents_and_helpers_raise() -> None:
    with pytest.raises(ValueError, match=r"parents: expected shape \[N\]"):
        check_parents([])
    with pytest.raises(ValueError, match="node must be"):
        path_to([-1, 0], 2)
    with pytest.raises(ValueError, match="past must be"):
        tree_attention_mask([-1, 0], -1)
    assert check_parents(torch.tensor([-1, 0, 0], dtype=torch.int32)).dtype == torch.long


@pytest.mark.parametrize("name", ["tiny64", "llama64"])
def test_bad_forward_tree_inputs_raise(name: str) -> None:
    model = FACTORIES[name][0]()
    vocab, max_len = model.vocab_size, model.max_length
    model.forward(torch.randint(0, vocab, (1, max_len - 3)))
    with pytest.raises(ValueError, match="max_length"):
        model.forward_tree(torch.tensor([[1, 2, 3, 4]]), [-1, 0, 0, 0])
    model.forward_tree(torch.tensor([[1, 2, 3]]), [-1, 0, 0])  # exactly fits
    assert model.cache_length == max_len
    model.reset()
    with pytest.raises(ValueError, match="input_ids of batch size 1"):
        model.forward_tree(torch.tensor([[1, 2], [3, 4]]), [-1, 0])
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.forward_tree(torch.tensor([[1, vocab]]), [-1, 0])
    with pytest.raises(ValueError, match="input_ids must be"):
        model.forward_tree(torch.tensor([1, 2]), [-1, 0])
    assert model.cache_length == 0


@pytest.mark.parametrize(
    "start,keep,msg",
    [
        (3, [0, 2, 1], "keep must be strictly increasing"),
        (3, [0, 0], "keep must be strictly increasing"),
        (3, [0, 4], "keep indices must satisfy"),
        (3, [-1, 2], "keep must hold indices >= 0"),
        (3, [0.0, 1.0], "keep must hold integers"),
        (3, [[0, 1]], "keep must be 1-D"),
        (3, ["x"], "keep must be"),
        (8, [0], "start must be in 0..7"),
        (-1, [0], "start must be in"),
        (True, [0], "start must be an int"),
        (2.0, [0], "start must be an int"),
    ],
)
@pytest.mark.parametrize("name", ["tiny64", "llama64"])
def test_bad_compact_raises(name: str, start, keep, msg: str) -> None:
    model = FACTORIES[name][0]()
    model.forward(torch.tensor([[1, 2, 3]]))
    model.forward_tree(torch.tensor([[4, 5, 6, 7]]), [-1, 0, 0, 1])
    with pytest.raises(ValueError, match=msg):
        model.compact(start, keep)
    assert model.cache_length == 7


def test_hf_failed_forward_tree_rolls_back() -> None:
    model, fresh = _llama64(), _llama64()
    model.forward(torch.tensor([[1, 2, 3]]))
    layer = model.model.model.layers[1]
    original = layer.forward

    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("boom")

    layer.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        model.forward_tree(torch.tensor([[4, 5, 6]]), [-1, 0, 0])
    layer.forward = original
    assert model.cache_length == 3
    assert all(lay.get_seq_length() == 3 for lay in model.cache.layers)
    model.forward_tree(torch.tensor([[4, 5, 6]]), [-1, 0, 0])
    model.compact(3, [0, 2])
    ref = fresh.forward(torch.tensor([[1, 2, 3, 4, 6, 7]])).logits[:, -1:]
    torch.testing.assert_close(model.forward(torch.tensor([[7]])).logits, ref, atol=1e-10, rtol=0)


def test_hf_unsupported_attention_refused(monkeypatch) -> None:
    model = _hf_llama()
    monkeypatch.setattr(HFModel, "_attn_implementation", lambda self: "flash_attention_2")
    with pytest.raises(ValueError, match="sdpa and eager"):
        model.forward_tree(torch.tensor([[1, 2]]), [-1, 0])
    assert model.cache_length == 0
