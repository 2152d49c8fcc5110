"""Draft training infrastructure on tiny random Llama targets and a char-level tokenizer: data
shards and their errors, batched generation, the teacher top-k cache, the reduced vocabulary,
the KD loss, training with exact interrupt/resume, checkpoint errors, evaluation, the engine's
greedy identity with a trained draft, and the ``train-draft`` pipeline end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from factories import tiny_hf
from hierspec.drafters import ModelDrafter
from hierspec.engine import generate
from hierspec.models import DraftConfig, DraftLM, HFModel, build_early_exit, load_draft, load_early_exit
from hierspec.models.draft import TargetIdentity
from hierspec.sampling import SamplingParams
from hierspec.train import (
    CheckpointError,
    DataConfig,
    DataError,
    Evaluator,
    TextCodec,
    TrainConfig,
    TrainError,
    cache_teacher,
    count_tokens,
    generate_responses,
    inverse_map,
    kd_loss,
    load_checkpoint,
    load_teacher,
    parse_sources,
    prepare_data,
    select_vocab,
    simulate_acceptance_length,
    train,
    vocab_coverage,
)
from hierspec.train.data import build_eval_set, list_shards, load_rows
from hierspec.train.distill import init_draft_from_target
from hierspec.train.teacher import TargetPass, teacher_path

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 128
SEQ = 32


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    model = tiny_hf(
        seed=seed,
        dtype=dtype,
        vocab_size=V,
        num_hidden_layers=4,
        max_position_embeddings=256,
        rope_theta=1e5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.3,  # context-dependent, fairly sharp next-token distributions
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<bos>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    return fast


def _codec() -> TextCodec:
    from hierspec.train import codec_from_tokenizer

    return codec_from_tokenizer(_char_tokenizer(), V)


def _corpus(root: Path, n: int = 60) -> Path:
    d = root / "corpus"
    d.mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i}\n\n" for i in range(n))
    (d / "a.py").write_text(text)
    (d / "b.txt").write_text("the cat sat on the mat. " * 20)
    return d


def _prompts(root: Path, name: str = "prompts.txt", n: int = 6) -> Path:
    p = root / name
    p.write_text("\n".join(f"write f{i}" + "!" * (i % 3) for i in range(n)) + "\n")
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(target, data_dir): raw corpus + generated responses, teacher top-k cached."""
    root = tmp_path_factory.mktemp("train")
    target = _llama()
    cfg = DataConfig(
        sources=f"raw:{_corpus(root)},gen:{_prompts(root)}",
        seq_len=SEQ,
        shard_rows=8,
        gen_max_new_tokens=12,
        gen_batch_size=4,
    )
    data = root / "data"
    prepare_data(data, cfg, _codec(), target, progress=False)
    stats = cache_teacher(target, data, k=16, batch_rows=4, progress=False)
    assert stats["shards_done"] == len(list_shards(data)) > 3
    return target, data


def _student(seed: int = 0, r: int = 64) -> DraftLM:
    vm = torch.arange(r)
    return DraftLM(DraftConfig(V, r, n_layer=1, d_model=32, n_head=4, max_length=256), vm, seed=seed)


# ============================================================================ data
def test_parse_sources_and_errors(tmp_path) -> None:
    s = parse_sources("raw:stdlib@2M, gen:sharegpt@10,raw:shakespeare")
    assert [(x.kind, x.name, x.limit) for x in s] == [
        ("raw", "stdlib", 2_000_000),
        ("gen", "sharegpt", 10),
        ("raw", "shakespeare", None),
    ]
    for bad, msg in [
        ("foo:stdlib", "expected raw:NAME"),
        ("raw:nothing", "unknown data source"),
        ("raw:stdlib@x", "bad count"),
        ("", "no data source"),
    ]:
        with pytest.raises(DataError, match=msg):
            parse_sources(bad)
    codec = _codec()
    cfg = DataConfig(sources=f"raw:{tmp_path / 'missing'}/", seq_len=SEQ)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "d1", cfg, codec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        prepare_data(tmp_path / "d2", DataConfig(sources=f"raw:{tmp_path / 'empty'}/", seq_len=SEQ), codec)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("   \n")
    with pytest.raises(DataError, match="is empty"):
        prepare_data(tmp_path / "d3", DataConfig(sources=f"raw:{tmp_path / 'blank'}/", seq_len=SEQ), codec)
    (tmp_path / "no_prompts.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        prepare_data(
            tmp_path / "d4",
            DataConfig(sources=f"gen:{tmp_path / 'no_prompts.txt'}", seq_len=SEQ),
            codec,
            _llama(),
        )
    with pytest.raises(DataError, match="needs the target"):
        prepare_data(tmp_path / "d5", DataConfig(sources=f"gen:{_prompts(tmp_path)}", seq_len=SEQ), codec)


def test_generate_responses_left_padded_batch_equals_one_by_one() -> None:
    target = _llama(dtype=torch.float64)
    codec = _codec()
    prompts = [codec.chat("hi"), codec.chat("a much longer prompt here"), codec.encode("x = 1")]
    batch = generate_responses(target, prompts, max_new_tokens=10, pad_id=0, eos_ids=[2], batch_size=3)
    single = [generate_responses(target, [p], max_new_tokens=10, pad_id=0, eos_ids=[2])[0] for p in prompts]
    assert batch == single
    assert all(0 < len(r) <= 10 for r in batch)
    for p, r in zip(prompts, batch, strict=True):  # and plain greedy continuation of the target
        ids = torch.tensor([p + r[:-1]])
        with torch.no_grad():
            argmax = target(ids).logits[0, len(p) - 1 :].argmax(-1).tolist()
        assert argmax == r
    sampled = generate_responses(target, prompts, max_new_tokens=10, pad_id=0, eos_ids=[2], temperature=1.0)
    assert sampled == generate_responses(
        target, prompts, max_new_tokens=10, pad_id=0, eos_ids=[2], temperature=1.0
    )


def test_prepare_data_shards_teacher_cache_and_resume(prepared, tmp_path) -> None:
    target, data = prepared
    shards = list_shards(data)
    names = [s.name for s in shards]
    assert any(n.startswith("raw-") for n in names) and any(n.startswith("gen0-") for n in names)
    ids, mask, _ = load_rows(next(s for s in shards if s.name.startswith("gen0-")))
    assert ids.shape[1] == SEQ and set(mask.unique().tolist()) <= {0, 1, 2} and (mask == 2).any()
    # the cached top-k is the teacher's: top-1 = argmax, logp + lse = logits
    ids, mask, meta = load_rows(shards[0])
    t = load_teacher(shards[0], meta)
    with torch.no_grad():
        logits = target(ids[:2]).logits
    ok = mask[:2] > 0  # padding positions (after a response) are not compared
    assert torch.equal(t["ids"][:2, :, 0].long()[ok], logits.argmax(-1)[ok])
    top = torch.gather(logits, -1, t["ids"][:2].long())
    torch.testing.assert_close(
        (t["logp"][:2].float() + t["lse"][:2, :, None])[ok], top[ok], atol=2e-2, rtol=1e-3
    )
    assert float(t["logp"].float().exp().sum(-1).max()) <= 1.0 + 1e-3
    # resume: only missing teacher files are recomputed
    teacher_path(shards[1]).unlink()
    again = cache_teacher(target, data, k=16, progress=False)
    assert again["shards_done"] == 1 and teacher_path(shards[1]).is_file()
    # prepare again with the same parameters: nothing to do; other parameters: refused
    manifest = (data / "manifest.json").read_text()
    import json

    cfg = DataConfig(
        **{k: v for k, v in json.loads(manifest).items() if k in DataConfig.__dataclass_fields__}
    )
    before = {p.name: p.stat().st_mtime_ns for p in list_shards(data)}
    prepare_data(data, cfg, _codec(), target, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in list_shards(data)}
    cfg.seq_len = 64
    with pytest.raises(DataError, match="other parameters"):
        prepare_data(data, cfg, _codec(), target, progress=False)


def test_select_vocab_and_coverage(prepared) -> None:
    _, data = prepared
    counts = count_tokens(data, V)
    assert int(counts.sum()) > 0
    vm = select_vocab(counts, 20, special_ids=[0, 1, 2, 3])
    assert vm.numel() == 20 and torch.equal(vm, vm.sort().values)
    assert {0, 1, 2, 3} <= set(vm.tolist())
    seen = counts.clone()
    seen[[0, 1, 2, 3]] = -1
    best = set(seen.argsort(descending=True, stable=True)[:16].tolist())
    assert best <= set(vm.tolist())
    rep = vocab_coverage(data, vm, V, counts=counts)
    assert 0.5 < rep["token_coverage"] <= 1.0
    assert 0.0 <= rep["teacher_mass_lower"] <= rep["teacher_mass_upper"] <= 1.0 + 1e-6
    full = vocab_coverage(data, torch.arange(V), V, counts=counts)
    assert full["token_coverage"] == 1.0 and full["teacher_mass_upper"] == pytest.approx(1.0, abs=1e-3)


# ============================================================================ loss
def _teacher_batch(seed: int, k: int, b: int = 2, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, t, V, generator=g)
    logp = torch.log_softmax(logits, -1)
    top, ids = logp.topk(k, -1)
    batch = {
        "t_logp": top.half(),
        "t_ids": ids.int(),
        "mask": torch.ones(b, t, dtype=torch.uint8),
        "ids": torch.randint(0, V, (b, t), generator=g),
    }
    return logits, batch


def test_kd_loss_is_exact_kl_with_full_topk_and_consistent_when_reduced() -> None:
    logits, batch = _teacher_batch(0, k=V)
    batch["t_logp"] = torch.log_softmax(logits, -1).topk(V, -1).values  # full precision
    student = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(1))
    loss, _ = kd_loss(student, batch, inverse_map(None, V))
    p = torch.softmax(logits, -1)
    exact = (p * (torch.log_softmax(logits, -1) - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, exact, atol=1e-5, rtol=1e-5)
    # reduced vocabulary, full top-k: KL(p restricted to S, renormalised || q)
    vm = torch.arange(0, V, 2)
    row_of = inverse_map(vm, V)
    s_red = torch.randn(2, 5, vm.numel(), generator=torch.Generator().manual_seed(2))
    loss, _ = kd_loss(s_red, batch, row_of)
    ps = p[..., vm] / p[..., vm].sum(-1, keepdim=True)
    exact = (ps * (ps.log() - torch.log_softmax(s_red, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, exact, atol=1e-5, rtol=1e-5)
    # optimum: student = teacher restricted -> zero loss
    loss, _ = kd_loss(logits[..., vm], batch, row_of)
    assert abs(float(loss)) < 1e-5


def test_kd_loss_tail_bucket_and_finite_grads() -> None:
    logits, batch = _teacher_batch(3, k=8)
    p = torch.softmax(logits, -1)
    top_ids = batch["t_ids"].long()
    # full-vocabulary student: bucket KL = KL between (top-8 tokens, rest) coarse-grainings
    s = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss, stats = kd_loss(s, batch, inverse_map(None, V), ce_weight=0.3)
    q = torch.softmax(s, -1)
    pt, qt = p.gather(-1, top_ids), q.gather(-1, top_ids)
    pt = batch["t_logp"].float().exp()
    pr, qr = 1 - pt.sum(-1), 1 - qt.sum(-1)
    kl = ((pt * (pt.log() - qt.log())).sum(-1) + pr * (pr.log() - qr.log())).mean()
    torch.testing.assert_close(torch.tensor(stats["kl"]), kl.detach(), atol=1e-4, rtol=1e-4)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # reduced vocabulary inside the top-k (no REST rows): finite loss and grads
    vm = top_ids[0, 0, :4]
    s2 = torch.randn(2, 5, 4, requires_grad=True)
    loss2, _ = kd_loss(s2, batch, inverse_map(vm, V), ce_weight=0.5)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s2.grad).all()


def test_simulate_acceptance_length() -> None:
    t = torch.tensor
    assert simulate_acceptance_length(t([True] * 12), 5) == (12, 2)  # 6 + 6
    assert simulate_acceptance_length(t([False] * 4), 5) == (4, 4)
    assert simulate_acceptance_length(t([True, True, False, True]), 5) == (4, 2)


# ============================================================================ training
def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, ckpt_every=5, log_every=1, ce_weight=0.1)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_the_loss(prepared, tmp_path) -> None:
    target, data = prepared
    student = _student()
    init_draft_from_target(student, target)
    losses: list[float] = []
    train(
        student,
        data,
        tmp_path / "run",
        _cfg(steps=40, lr=1e-2),
        progress=False,
        on_step=lambda s, st: losses.append(st["kl"]),
    )
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (tmp_path / "run" / "train_log.jsonl").is_file()


def test_interrupt_and_resume_is_exact(prepared, tmp_path) -> None:
    _, data = prepared
    full = _student()
    train(full, data, tmp_path / "a", _cfg(), progress=False)

    class Stop(Exception):
        pass

    def stop_at_8(step, _stats):
        if step == 8:
            raise Stop

    part = _student()
    with pytest.raises(Stop):
        train(part, data, tmp_path / "b", _cfg(), progress=False, on_step=stop_at_8)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 5  # lost steps 6..8 only
    resumed = _student()  # a fresh process: same config, weights come from the checkpoint
    out = train(resumed, data, tmp_path / "b", _cfg(), resume=True, progress=False)
    assert out["step"] == 12
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # bitwise: same batches, same float ops
    # extending a finished run
    more = train(resumed, data, tmp_path / "b", _cfg(steps=14), resume=True, progress=False)
    assert more["step"] == 14


def test_checkpoint_errors(prepared, tmp_path) -> None:
    _, data = prepared
    train(_student(), data, tmp_path / "r", _cfg(steps=2), progress=False)
    ck = tmp_path / "r" / "checkpoint.pt"
    with pytest.raises(TrainError, match="exists"):
        train(_student(), data, tmp_path / "r", _cfg(steps=2), progress=False)
    with pytest.raises(TrainError, match="another student"):
        train(_student(r=32), data, tmp_path / "r", _cfg(steps=4), resume=True, progress=False)
    with pytest.raises(TrainError, match="changed settings"):
        train(_student(), data, tmp_path / "r", _cfg(steps=4, lr=0.5), resume=True, progress=False)
    raw = ck.read_bytes()
    ck.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        train(_student(), data, tmp_path / "r", _cfg(steps=4), resume=True, progress=False)
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 0x55
    ck.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ck)
    ck.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(CheckpointError, match="not a hierspec"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_trained_draft_eval_export_and_engine_greedy_identity(prepared, tmp_path) -> None:
    target, data = prepared
    codec = _codec()
    student = _student()
    init_draft_from_target(student, target)
    train(student, data, tmp_path / "run", _cfg(steps=20, lr=1e-2), progress=False)
    prompts = _prompts(tmp_path, "eval.txt", n=3)
    ids, mask = build_eval_set(
        tmp_path / "eval.safetensors", f"gen:{prompts}", codec, target, seq_len=SEQ, max_new_tokens=12
    )
    assert (mask == 2).any()
    held_out = TargetPass(target, ids, mask, batch_rows=2)
    with torch.no_grad():
        full = target(input_ids=ids[:3], attention_mask=(mask[:3] > 0).long(), use_cache=False).logits
    pos = mask[:3] > 0  # the pass recomputes the teacher's logits from its features
    torch.testing.assert_close(held_out.logits(0, 3)[pos], full[pos], atol=1e-4, rtol=1e-4)
    metrics = Evaluator(held_out, gamma=5)(student)
    assert 0 <= metrics["agree"] <= 1 and 0 <= metrics["accept_t1"] <= 1
    assert 0 < metrics["coverage"] <= 1 and 1.0 <= metrics["mal_g5"] <= 6.0
    ident = TargetIdentity(vocab_size=V, tokenizer=codec.fingerprint)
    student.save(tmp_path / "draft.safetensors", ident)
    draft = load_draft(tmp_path / "draft.safetensors", ident)
    tgt = HFModel(target)
    prompt = codec.chat("write f1")
    plain = generate(tgt, prompt, params=SamplingParams(temperature=0), max_new_tokens=24)
    spec = generate(
        tgt,
        prompt,
        drafter=ModelDrafter(draft),
        gamma=5,
        params=SamplingParams(temperature=0),
        max_new_tokens=24,
    )
    assert spec.token_ids == plain.token_ids
    assert spec.stats.num_spec_steps < 24  # some drafts were accepted


def test_early_exit_head_training_and_export(prepared, tmp_path) -> None:
    target, data = prepared
    ee = build_early_exit(target, 2, vocab_map=torch.arange(64), adapter_dim=16)
    losses: list[float] = []
    train(
        ee,
        data,
        tmp_path / "ee",
        _cfg(steps=25, lr=1e-2),
        progress=False,
        on_step=lambda s, st: losses.append(st["kl"]),
    )
    assert sum(losses[-5:]) < sum(losses[:5])
    ee.save(tmp_path / "ee.safetensors")
    loaded = load_early_exit(tmp_path / "ee.safetensors", target)
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded.forward(ids).logits, ee.forward(ids).logits, atol=5e-2, rtol=0)
    tgt = HFModel(target)
    prompt = _codec().chat("write f2")
    plain = generate(tgt, prompt, params=SamplingParams(temperature=0), max_new_tokens=16)
    spec = generate(
        tgt,
        prompt,
        drafter=ModelDrafter(loaded),
        gamma=3,
        params=SamplingParams(temperature=0),
        max_new_tokens=16,
    )
    assert spec.token_ids == plain.token_ids


def test_cli_pipeline_end_to_end_and_resume(tmp_path) -> None:
    from hierspec.train.cli import build_parser, run

    corpus, prompts = _corpus(tmp_path, n=30), _prompts(tmp_path)
    evalp = _prompts(tmp_path, "heldout.txt", n=2)
    argv = [
        "--kind",
        "standalone",
        "--out",
        str(tmp_path / "out"),
        "--data",
        f"raw:{corpus},gen:{prompts}",
        "--eval",
        f"gen:{evalp}",
        "--seq-len",
        str(SEQ),
        "--shard-rows",
        "8",
        "--gen-max-new",
        "8",
        "--topk",
        "8",
        "--vocab",
        "48",
        "--layers",
        "1",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--ckpt-every",
        "3",
        "--eval-every",
        "3",
        "--no-progress",
    ]
    target, tok = _llama(), _char_tokenizer()
    summary = run(build_parser().parse_args(argv), target, tok)
    assert summary["train"]["step"] == 6 and "mal_g5" in summary["eval_final"]
    assert summary["vocab"]["size"] == 48
    out = tmp_path / "out"
    assert (out / "draft.safetensors").is_file() and (out / "summary.json").is_file()
    card = (out / "draft.md").read_text()
    assert "greedy agreement with the target" in card and "trainable parameters" in card
    assert summary["train_seconds_total"] > 0
    draft = load_draft(
        out / "draft.safetensors", TargetIdentity(vocab_size=V, tokenizer=_codec().fingerprint)
    )
    assert draft.config.n_vocab == 48
    with pytest.raises(TrainError, match="exists"):
        run(build_parser().parse_args(argv), target, tok)
    argv[argv.index("--steps") + 1] = "9"
    summary = run(build_parser().parse_args([*argv, "--resume"]), target, tok)
    assert summary["train"]["step"] == 9
    ee_argv = [*argv[:1], "early-exit", *argv[2:]]
    ee_argv[ee_argv.index("--out") + 1] = str(tmp_path / "ee")
    ee_argv += ["--exit-layer", "2", "--adapter-dim", "8", "--data-dir", str(out / "data")]
    summary = run(build_parser().parse_args(ee_argv), target, tok)
    assert (tmp_path / "ee" / "early_exit.safetensors").is_file()


def test_copy_layers_init_reproduces_the_target() -> None:
    """A draft of the target's width initialised with all its layers computes the target's
    logits on the reduced vocabulary; a wrong shape is refused."""
    pytest.importorskip("transformers")
    from hierspec.models.draft import DraftConfig, DraftLM
    from hierspec.train.cli import rope_theta
    from hierspec.train.distill import TrainError, init_draft_from_target_layers

    hf = tiny_hf(
        seed=0,
        dtype=torch.float64,
        vocab_size=40,
        intermediate_size=48,
        num_hidden_layers=3,
        max_position_embeddings=64,
        rope_theta=1e4,
        tie_word_embeddings=True,
    )
    vm = torch.arange(0, 40, 2)
    dc = DraftConfig(
        vocab_size=40,
        n_vocab=20,
        n_layer=3,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        d_ff=48,
        rope_theta=rope_theta(hf.config),
        norm_eps=hf.config.rms_norm_eps,
        max_length=64,
    )
    draft = DraftLM(dc, vm, dtype=torch.float64)
    init_draft_from_target_layers(draft, hf, [0, 1, 2])
    ids = torch.tensor([[0, 4, 8, 2, 6, 10, 12]])  # all inside vocab_map
    ref = hf(input_ids=ids).logits[0][:, vm]
    out = draft.forward(ids).logits[0][:, vm]
    # transformers' RMSNorm computes in float32 even for float64 models: agreement to ~1e-7
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert rope_theta(hf.config) == 1e4
    small = DraftLM(DraftConfig(vocab_size=40, n_vocab=20, n_layer=1, d_model=16, n_head=2), vm)
    with pytest.raises(TrainError, match="d_model"):
        init_draft_from_target_layers(small, hf, [0])


def test_eagle_head_training_resume_eval_export(tmp_path) -> None:
    """``train-draft --kind eagle``: feature cache, unrolled loss that goes down, evaluator,
    exact resume, export that loads onto the target and drafts with greedy identity."""
    from hierspec.drafters.eagle import EagleDrafter
    from hierspec.models.eagle import load_eagle
    from hierspec.train.cli import build_parser, run
    from hierspec.train.eagle import feature_path, load_features
    from hierspec.train.teacher import target_pass

    corpus, prompts = _corpus(tmp_path, n=30), _prompts(tmp_path)
    evalp = _prompts(tmp_path, "heldout.txt", n=2)
    argv = [
        "--kind", "eagle", "--out", str(tmp_path / "eg"), "--data", f"raw:{corpus},gen:{prompts}",
        "--eval", f"gen:{evalp}", "--seq-len", str(SEQ), "--shard-rows", "8", "--gen-max-new", "8",
        "--topk", "8", "--vocab", "48", "--steps", "8", "--batch-size", "4", "--ckpt-every", "4",
        "--eval-every", "4", "--lr", "3e-3", "--unroll", "2", "--no-progress",
    ]  # fmt: skip
    target, tok = _llama(), _char_tokenizer()
    summary = run(build_parser().parse_args(argv), target, tok)
    out = tmp_path / "eg"
    shard = list_shards(out / "data")[0]
    ids, mask, _ = load_rows(shard)
    h, _ = target_pass(target, ids[:2], mask[:2])
    torch.testing.assert_close(load_features(shard)[:2].float(), h.float(), atol=0.05, rtol=0.02)  # bf16 copy
    assert feature_path(shard).is_file() and summary["features"]["shards"] >= 1
    assert summary["train"]["step"] == 8 and "mal_g5" in summary["eval_final"]
    assert {f"agree{j}" for j in range(1, 6)} <= set(summary["eval_final"])
    assert (out / "eagle.md").read_text().count("EAGLE") >= 1
    head = load_eagle(out / "eagle.safetensors", target, tokenizer=tok)
    assert head.config.n_vocab == 48
    prompt = [1, 5, 9, 14, 20, 7]
    ref = generate(HFModel(target), prompt, params=SamplingParams(temperature=0), max_new_tokens=20)
    res = generate(
        HFModel(target), prompt, drafter=EagleDrafter(head), params=SamplingParams(temperature=0),
        max_new_tokens=20,
    )  # fmt: skip
    assert res.token_ids == ref.token_ids
    argv[argv.index("--steps") + 1] = "10"
    summary = run(build_parser().parse_args([*argv, "--resume"]), target, tok)
    assert summary["train"]["step"] == 10


def test_eagle_unrolled_loss_goes_down(tmp_path) -> None:
    """The EAGLE student's loss (all unrolled steps) on a fixed batch falls with training."""
    from hierspec.models.eagle import build_eagle_head
    from hierspec.train.distill import ShardLoader
    from hierspec.train.eagle import EagleStudent, cache_features, feature_rms

    target = _llama()
    target.requires_grad_(False)
    d = tmp_path / "data"
    cfg_d = DataConfig(sources=f"raw:{_corpus(tmp_path, n=30)}", seq_len=SEQ, shard_rows=8)
    prepare_data(d, cfg_d, _codec(), target, progress=False)
    cache_teacher(target, d, k=8, progress=False)
    cache_features(target, d, progress=False)
    vm = select_vocab(count_tokens(d, V), 48, _codec().special_ids)
    student = EagleStudent(build_eagle_head(target, vm), unroll=3, feature_scale=feature_rms(d))
    batch, _ = ShardLoader(d, features=True).next_batch({"epoch": 0, "pos": 0}, 4)
    row_of = inverse_map(vm, V)
    cfg = _cfg(steps=30, lr=3e-3)
    with torch.no_grad():
        before, st = student.train_loss(batch, row_of, cfg)
    assert {"reg1", "kl3", "agree2"} <= set(st)
    train(student, d, tmp_path / "run", cfg, progress=False)
    with torch.no_grad():
        after, _ = student.train_loss(batch, row_of, cfg)
    assert float(after) < 0.8 * float(before)


def test_features_pass_writes_the_same_teacher_files(tmp_path) -> None:
    """``cache_features(teacher_k=k)`` writes each missing teacher file from its own forward; the
    files equal `cache_teacher`'s (which then finds nothing to do) and load for training."""
    from hierspec.train.eagle import cache_features
    from hierspec.train.teacher import load_teacher, teacher_path

    target = _llama()
    d1, d2 = tmp_path / "a", tmp_path / "b"
    cfg_d = DataConfig(sources=f"raw:{_corpus(tmp_path, n=20)}", seq_len=SEQ, shard_rows=8)
    prepare_data(d1, cfg_d, _codec(), target, progress=False)
    prepare_data(d2, cfg_d, _codec(), target, progress=False)
    cache_teacher(target, d1, k=8, progress=False)
    shards = list_shards(d2)
    teacher_path(shards[0]).parent.mkdir(parents=True, exist_ok=True)
    teacher_path(shards[0]).write_bytes(teacher_path(list_shards(d1)[0]).read_bytes())  # already had one
    got = cache_features(target, d2, teacher_k=8, progress=False)
    assert got["written"] == len(shards) > 1 and got["teacher_written"] == len(shards) - 1
    assert cache_teacher(target, d2, k=8, progress=False)["shards_done"] == 0
    for s1, s2 in zip(list_shards(d1), shards, strict=True):
        _, _, meta = load_rows(s2)
        a, b = load_teacher(s1), load_teacher(s2, meta)
        torch.testing.assert_close(b["lse"], a["lse"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(b["logp"].float(), a["logp"].float(), atol=2e-3, rtol=1e-3)
        assert (b["ids"] == a["ids"]).float().mean() > 0.99  # near-ties may swap order


def test_students_share_one_protocol() -> None:
    """Every trainable thing is a `Student`: drafts are wrapped, EAGLE implements it itself, and
    anything else is refused by name."""
    from hierspec.models.eagle import build_eagle_head
    from hierspec.train.distill import DistilledLM, Student, as_student, describe_student, trainable_module
    from hierspec.train.eagle import EagleStudent

    draft = _student()
    st = as_student(draft)
    assert isinstance(st, DistilledLM) and isinstance(st, Student) and st.trainable is draft
    assert describe_student(draft)["kind"] == "standalone" and not st.needs_features
    eagle = EagleStudent(build_eagle_head(_llama(), torch.arange(48)))
    assert as_student(eagle) is eagle and trainable_module(eagle) is eagle.head
    with pytest.raises(TypeError, match="cannot train a Linear: expected DraftLM"):
        as_student(torch.nn.Linear(2, 2))


def test_target_pass_refuses_a_head_it_cannot_recompute(prepared) -> None:
    """Negative control of `TargetPass`: when the logits are not the output embedding of the last
    hidden state (here: a foreign head), recomputing them would be silently wrong, so it refuses."""
    target, data = prepared
    ids, mask, _ = load_rows(list_shards(data)[0])
    assert TargetPass(target, ids[:2], mask[:2]).h.shape[:2] == ids[:2].shape
    other = torch.nn.Linear(target.config.hidden_size, V, bias=False)
    real = target.get_output_embeddings
    target.get_output_embeddings = lambda: other
    try:
        with pytest.raises(DataError, match="logits are not the output embedding"):
            TargetPass(target, ids[:2], mask[:2])
    finally:
        target.get_output_embeddings = real
