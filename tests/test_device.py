"""Device plumbing of the decode loop (issue #20): RNG streams on the target's device, every tensor
fed to the model and to the rule on the model's device, one host sync per step at temperature 0,
no host sync per drafted EAGLE or draft-model token (a draft-model greedy draft never leaves the
meta device), and the typed capability protocols (trees, features).

On this CPU-only machine the device checks run on ``cpu``; every test parametrised over
``DEVICES`` also runs on ``cuda`` where one is present."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from factories import tiny_hf
from hierspec import engine
from hierspec.drafters import Draft, NgramDrafter
from hierspec.drafters.base import FeatureDrafter, TreeDrafter, TreeSpec
from hierspec.drafters.model import ModelDrafter
from hierspec.engine import generate
from hierspec.hierarchy import SpeculativeDrafter
from hierspec.models import TinyGPT, TinyGPTConfig
from hierspec.models.base import ForwardOutput, LanguageModel, TreeModel, tree_support
from hierspec.rng import Streams
from hierspec.sampling import SamplingParams, check_generator, make_generators, uniforms
from hierspec.step import StepContext, speculative_step
from hierspec.verify import get_rule

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GREEDY = SamplingParams(temperature=0)


def plain_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        model.reset()
        seq.append(int(model.forward(torch.tensor([seq], device=model.device)).logits[0, -1].argmax()))
    model.reset()
    return seq[len(prompt) :]


class Recorder:
    """A `LanguageModel` wrapper that records the device of every tensor given to ``forward``."""

    def __init__(self, model) -> None:
        self.inner = model
        self.vocab_size = model.vocab_size
        self.max_length = model.max_length
        self.seen: list[torch.device] = []

    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)
    cache_length = property(lambda self: self.inner.cache_length)

    def forward(self, input_ids, *, output_hidden=False):
        self.seen.append(input_ids.device)
        return self.inner.forward(input_ids, output_hidden=output_hidden)

    def crop(self, n):
        self.inner.crop(n)

    def reset(self):
        self.inner.reset()


def recording_rule(name, seen):
    rule = get_rule(name)

    def call(x, q, rows, g, validate=False, uniforms=None):
        seen.append(("draft_tokens", x.device))
        seen.append(("target_rows", rows.device))
        if q is not None:
            seen.append(("draft_probs", q.device))
        if uniforms is not None:
            seen.append(("uniforms", uniforms.device))
        seen.append(("generator", g.device))
        return rule(x, q, rows, g, validate=validate, uniforms=uniforms)

    return call


def tiny(device, seed=3, layers=2):
    cfg = TinyGPTConfig(vocab_size=32, n_layer=layers, seed=seed, max_length=128)
    return TinyGPT(cfg, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_makes_streams_on_the_target_device(device, monkeypatch):
    made = []

    def spy(seed, device="cpu"):
        made.append(torch.device(device))
        return Streams(seed, device)

    monkeypatch.setattr(engine, "Streams", spy)
    target = tiny(device)
    generate(target, [1, 2, 3], drafter=NgramDrafter(), params=SamplingParams(), max_new_tokens=4, seed=0)
    assert made == [target.device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_k=8)])
@pytest.mark.parametrize("rule", ["token", "block", "hsd"])
def test_every_step_tensor_on_the_model_device(device, params, rule, monkeypatch):
    target, draft = Recorder(tiny(device)), tiny(device, layers=1)
    seen = []
    monkeypatch.setattr(engine, "get_rule", lambda name: recording_rule(name, seen))
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    for drafter in (None, NgramDrafter(), ModelDrafter(draft)):
        out = generate(target, prompt, drafter=drafter, rule=rule, params=params, max_new_tokens=12, seed=1)
        assert len(out.token_ids) == 12
    dev = target.device
    assert target.seen and all(d == dev for d in target.seen)
    assert seen and all(d.type == dev.type for _, d in seen), seen


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_identity_on_device(device):
    target, prompt = tiny(device), [1, 5, 7, 5, 7, 5, 2, 9]
    ref = plain_greedy(target, prompt, 20)
    for drafter in (None, NgramDrafter()):
        out = generate(target, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=20)
        assert out.token_ids == ref


class FixedDrafter:
    """Proposes the same tokens every step (deterministic), without touching the host."""

    vocab_size = None

    def __init__(self, tokens) -> None:
        self.tokens = tokens

    def propose(self, context, num_tokens, params, generator=None):
        return Draft(self.tokens[:, :num_tokens])

    def reset(self) -> None:
        pass


class FixedModel:
    """A `LanguageModel` returning fixed logits with no host sync of its own."""

    vocab_size, max_length = 8, 64
    dtype = torch.float32

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.cache_length = 0
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(8, 8, generator=g).to(self.device)

    def forward(self, input_ids, *, output_hidden=False):
        self.cache_length += input_ids.shape[1]
        return ForwardOutput(self.table[input_ids])

    def crop(self, n):
        self.cache_length = n

    def reset(self):
        self.cache_length = 0


class SyncCounter:
    """Counts host reads of tensor values (tolist / item / int / bool / float)."""

    NAMES = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__")

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def test_greedy_step_syncs_once(monkeypatch):
    """speculative_step at temperature 0 reads the device once: the commit's .tolist()."""
    model = FixedModel()
    model.forward(torch.tensor([[1, 2]]))
    context = torch.tensor([[1, 2, 3]])
    drafter = FixedDrafter(torch.tensor([[4, 5, 6, 7]]))
    ctx = StepContext(model, drafter, get_rule("greedy"), GREEDY, Streams(0))
    counter = SyncCounter(monkeypatch)
    res = speculative_step(ctx, context, 4)
    assert counter.count == 1
    assert len(res.tokens) == res.accepted + 1


def test_greedy_step_nan_logits_raise():
    model = FixedModel()
    model.table[3, 2] = float("nan")
    model.forward(torch.tensor([[1, 2]]))
    ctx = StepContext(model, None, get_rule("greedy"), GREEDY, Streams(0))
    with pytest.raises(ValueError, match="NaN"):
        speculative_step(ctx, torch.tensor([[1, 2, 3]]), 0)


def test_eagle_greedy_chain_has_no_sync_per_drafted_token(monkeypatch):
    pytest.importorskip("transformers")
    from hierspec.drafters.eagle import EagleDrafter
    from hierspec.models import HFModel
    from hierspec.models.eagle import build_eagle_head

    hf = tiny_hf(seed=0, max_position_embeddings=128)
    target = HFModel(hf)
    counts = {}
    for k in (2, 6):
        drafter = EagleDrafter(build_eagle_head(hf, torch.arange(hf.config.vocab_size), seed=0))
        ctx = torch.tensor([[3, 9, 27, 3, 9]])
        target.reset()
        drafter.observe_target(0, target.forward(ctx[:, :-1], output_hidden=True).hidden[0])
        counter = SyncCounter(monkeypatch)
        draft = drafter.propose(ctx, k, GREEDY)
        counts[k] = counter.count
        monkeypatch.undo()
        assert draft.num_tokens == k
    assert counts[2] == counts[6], counts


def test_model_drafter_greedy_draft_has_no_sync_per_drafted_token(monkeypatch):
    """A greedy ModelDrafter draft reads the device a number of times independent of k (the cache
    sync's common prefix, on CPU tensors), and drafts the model's greedy chain."""
    table = FixedModel().table
    counts = {}
    for k in (2, 6):
        drafter = ModelDrafter(FixedModel())
        counter = SyncCounter(monkeypatch)
        draft = drafter.propose(torch.tensor([[1, 2, 3]]), k, GREEDY)
        counts[k] = counter.count
        monkeypatch.undo()
        chain, x = [], 3
        for _ in range(k):
            x = int(table[x].argmax())
            chain.append(x)
        assert draft.tokens.tolist() == [chain] and draft.probs is None
        ref = torch.softmax(table[[3, *chain[:-1]]].double(), -1).amax(-1).float()
        assert torch.equal(draft.confidence, ref)
        assert drafter._fed.tolist() == [1, 2, 3, *chain[:-1]]  # deferred copy, read once
    assert counts[2] == counts[6], counts


def test_model_drafter_stop_rule_reads_each_confidence(monkeypatch):
    """With a stop rule the callback needs c_t on the host: one read per drafted token (the
    documented exception); the rule still ends the draft where it says."""
    counts = {}
    for k in (2, 6):
        drafter = ModelDrafter(FixedModel())
        counter = SyncCounter(monkeypatch)
        draft = drafter.propose(torch.tensor([[1, 2, 3]]), k, GREEDY, stop=lambda conf: False)
        counts[k] = counter.count
        monkeypatch.undo()
        assert draft.num_tokens == k
    assert counts[6] - counts[2] == 4, counts
    drafter = ModelDrafter(FixedModel())
    seen = []
    ctx = torch.tensor([[1, 2, 3]])
    draft = drafter.propose(ctx, 6, GREEDY, stop=lambda c: seen.append(list(c)) or len(c) >= 2)
    conf = draft.confidence.tolist()  # float32 copies of what the rule saw
    assert draft.num_tokens == 2
    assert seen == [pytest.approx(conf[:1], rel=1e-6), pytest.approx(conf, rel=1e-6)]


def test_model_drafter_greedy_draft_never_leaves_the_model_device():
    """On the meta device every host read or copy of a value raises: a greedy draft of k tokens
    feeds the model, and returns tokens and confidences, on the model's device only."""
    model = Recorder(FixedModel("meta"))
    draft = ModelDrafter(model).propose(torch.tensor([[1, 2, 3]]), 5, GREEDY)
    assert draft.tokens.shape == (1, 5) and draft.confidence.shape == (5,)
    assert draft.tokens.device.type == "meta" and draft.confidence.device.type == "meta"
    assert len(model.seen) == 5 and all(d.type == "meta" for d in model.seen)


def _check_draft_device(draft, dev):
    assert draft.tokens.device == dev
    for t in (draft.probs, draft.confidence):
        assert t is None or t.device == dev


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_k=8)])
def test_model_and_hierarchy_drafters_on_the_model_device(device, params):
    """ModelDrafter and SpeculativeDrafter feed their models, and return their drafts, on the
    model's device, with streams made there."""
    bottom, level = Recorder(tiny(device, layers=1)), Recorder(tiny(device, seed=4))
    dev = level.device
    g_draft, _ = make_generators(0, dev)
    for drafter in (ModelDrafter(bottom), SpeculativeDrafter(level, ModelDrafter(bottom), "block", gamma=3)):
        ctx = torch.tensor([[1, 5, 7, 5, 7]])
        for _ in range(3):
            draft = drafter.propose(ctx, 4, params, g_draft)
            assert draft.num_tokens == 4
            _check_draft_device(draft, dev)
            ctx = torch.cat([ctx, draft.tokens[:, :2].cpu()], 1)
    for model in (bottom, level):
        assert model.seen and all(d == dev for d in model.seen)


def test_uniforms_and_cpu_streams_reproduce():
    a, b = make_generators(5)
    a2, b2 = make_generators(5)
    assert torch.equal(uniforms(4, a), torch.rand(4, generator=a2, dtype=torch.float64))
    assert torch.equal(torch.rand(3, generator=b), torch.rand(3, generator=b2))
    assert a.device == torch.device("cpu")


def test_generator_on_another_device_is_a_clear_error():
    fake = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="make_generators"):
        check_generator(fake, torch.device("cpu"))
    rule = get_rule("token")
    p = torch.full((1, 2, 4), 0.25)
    with pytest.raises(ValueError, match="generator"):
        rule(torch.tensor([[1]]), None, p, fake)


def test_capability_protocols():
    pytest.importorskip("transformers")
    from hierspec.drafters.eagle import EagleDrafter
    from hierspec.models import HFModel
    from hierspec.models.eagle import build_eagle_head

    hf = tiny_hf(seed=0, max_position_embeddings=64)
    target = HFModel(hf)
    assert isinstance(target, TreeModel) and isinstance(target, LanguageModel)
    assert target.tree_attention and tree_support(target) is None
    assert isinstance(tiny("cpu"), TreeModel)
    assert not isinstance(Recorder(tiny("cpu")), TreeModel)
    drafter = EagleDrafter(build_eagle_head(hf, torch.arange(hf.config.vocab_size)))
    assert isinstance(drafter, FeatureDrafter) and isinstance(drafter, TreeDrafter)
    assert not isinstance(NgramDrafter(), FeatureDrafter)
    assert not isinstance(NgramDrafter(), TreeDrafter)

    any_tree = SimpleNamespace(vocab_size=None, propose_tree=print, reset=print)
    assert isinstance(any_tree, TreeDrafter)
    with pytest.raises(ValueError, match=r"cannot verify trees.*forward_tree"):
        generate(Recorder(tiny("cpu")), [1, 2], drafter=any_tree, params=GREEDY, tree=TreeSpec())
    with pytest.raises(ValueError, match=r"cannot draft trees.*propose_tree"):
        generate(target, [1, 2], drafter=NgramDrafter(), params=GREEDY, tree=TreeSpec())
    hf.config._attn_implementation = "flash_attention_2"  # no tree mask: refused up front
    assert not target.tree_attention
    with pytest.raises(ValueError, match=r"flash_attention_2.*sdpa"):
        generate(target, [1, 2], drafter=drafter, params=GREEDY, tree=TreeSpec())


def test_hf_compile_option():
    pytest.importorskip("transformers")
    from hierspec.models import HFModel

    with pytest.raises(ValueError, match="compile"):
        HFModel(tiny_hf(seed=0, max_position_embeddings=64), compile="yes")
    hf = tiny_hf(seed=0, max_position_embeddings=64)
    assert HFModel(hf)._model_fn is hf  # eager by default


@pytest.mark.slow
def test_hf_compiled_forward_matches_eager():
    """compile= goes through torch.compile (backend "eager": tracing only, ~30 s on this CPU; the
    inductor backend takes minutes here and is meant for CUDA)."""
    pytest.importorskip("transformers")
    from hierspec.models import HFModel

    hf = tiny_hf(seed=0, max_position_embeddings=64, dtype=torch.float64)
    eager, compiled = HFModel(hf), HFModel(hf, compile={"backend": "eager"})
    prompt = [3, 9, 27, 3, 9, 27, 3]
    ref = generate(eager, prompt, drafter=NgramDrafter(), gamma=3, params=GREEDY, max_new_tokens=10)
    out = generate(compiled, prompt, drafter=NgramDrafter(), gamma=3, params=GREEDY, max_new_tokens=10)
    assert out.token_ids == ref.token_ids
