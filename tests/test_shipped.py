"""The shipped drafts and early-exit heads (`hierspec/weights/`): they load onto the embedded
SmolLM2, keep greedy decoding token-identical to plain decoding (fp32) with every method that
uses them, and their model cards exist."""

from __future__ import annotations

import pytest
import torch

from hierspec.models import shipped

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smollm():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from hierspec.models import smollm2

    try:
        smollm2.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return smollm2.load_smollm2(torch.float32)


def test_files_and_model_cards():
    for name in shipped.DRAFTS:
        path = shipped.draft_path(name)
        assert path.with_suffix(".md").is_file()
        assert path.stat().st_size < 32 * 2**20  # small files only
    for e in shipped.EXIT_HEADS:
        path = shipped.exit_head_path(e)
        assert path.with_suffix(".md").is_file()
        assert path.stat().st_size < 32 * 2**20
    assert shipped.DEFAULT_DRAFT in shipped.DRAFTS
    assert all(e in shipped.EXIT_HEADS for e in shipped.DEFAULT_EXITS)
    with pytest.raises(ValueError, match="unknown shipped draft"):
        shipped.draft_path("huge")
    with pytest.raises(ValueError, match="no shipped early-exit head"):
        shipped.exit_head_path(3)


def _chat_ids(tok, text: str) -> list[int]:
    """The chat-template token ids of one user turn, ready for the assistant's reply."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_identity_with_shipped_weights(smollm):
    from hierspec.drafters import ModelDrafter
    from hierspec.engine import generate
    from hierspec.hierarchy import build_hierarchy
    from hierspec.hispec import build_early_exit_spec, build_hispec
    from hierspec.models import load_draft, load_early_exit
    from hierspec.sampling import SamplingParams

    target, tok = smollm
    greedy = SamplingParams(temperature=0)
    ids = _chat_ids(tok, "List three uses of a paperclip.")
    n = 24
    ref = generate(target, ids, params=greedy, max_new_tokens=n).token_ids
    drafts = {name: load_draft(shipped.draft_path(name)) for name in shipped.DRAFTS}
    for name, d in drafts.items():
        out = generate(target, ids, drafter=ModelDrafter(d), params=greedy, gamma=5, max_new_tokens=n)
        assert out.token_ids == ref, name
        assert out.stats.num_accepted_draft_tokens > 0, name  # a trained draft is right sometimes
    stack = build_hierarchy([drafts["small"], drafts["large"]], None, gammas=[1, 3])
    assert generate(target, ids, drafter=stack, params=greedy, gamma=4, max_new_tokens=n).token_ids == ref
    heads = {
        e: load_early_exit(shipped.exit_head_path(e), target.model, tokenizer=tok).head
        for e in shipped.EXIT_HEADS
    }
    ld, li = shipped.DEFAULT_EXITS
    hs = build_hispec(target.model, heads[ld], heads[li], nd=2, ni=4)
    assert hs.generate(ids, params=greedy, max_new_tokens=n).token_ids == ref
    ee = build_early_exit_spec(target.model, heads[ld], gamma=3)
    out = ee.generate(ids, params=greedy, max_new_tokens=n)
    assert out.token_ids == ref and out.stats.num_accepted_draft_tokens > 0


def test_shipped_eagle_head(smollm):
    """The shipped EAGLE head: small file with a card, loads onto SmolLM2, chains and trees are
    token-identical to plain greedy decoding and accept drafts."""
    from hierspec.drafters.eagle import EagleDrafter, TreeSpec
    from hierspec.engine import generate
    from hierspec.models.eagle import load_eagle
    from hierspec.sampling import SamplingParams

    path = shipped.eagle_path()
    assert path.with_suffix(".md").is_file() and path.stat().st_size < 32 * 2**20
    target, tok = smollm
    greedy = SamplingParams(temperature=0)
    ids = _chat_ids(tok, "Explain what a hash map is.")
    n = 24
    ref = generate(target, ids, params=greedy, max_new_tokens=n).token_ids
    drafter = EagleDrafter(load_eagle(path, target, tokenizer=tok))
    for tree in (None, TreeSpec(depth=4, topk=3, budget=10)):
        out = generate(target, ids, drafter=drafter, params=greedy, gamma=5, max_new_tokens=n, tree=tree)
        assert out.token_ids == ref, tree
        assert out.stats.num_accepted_draft_tokens > 0, tree
