"""Speculative speculative decoding (Saguaro): pure knobs, the cost model, greedy identity, chi²
exactness through the real two-process path (hits, forced misses, both fallbacks, C in {1, 0.5,
0.1}), a negative control with power, faults (speculator killed / hung mid-generation) and bad
input with no process left behind."""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch

from hierspec.models import TinyGPT, TinyGPTConfig, load_draft, make_tiny_pair
from hierspec.sampling import SamplingParams
from hierspec.ssd import Speculator, SSDOptions, SSDSession, generate_ssd, saguaro
from hierspec.ssd.cost import predict, sd_speedup, ssd_over_sd_bounds, ssd_speedup
from test_engine import chi2_p, exact_joint, plain_greedy

N_CHI2 = 1000
N_NEGATIVE = 400  # measured: the control fails with p ~ 1e-24..1e-44 at 800 samples


# ------------------------------------------------------------------- pure functions
def test_fanout_allocations():
    assert saguaro.uniform_fanout(8, 3) == [2, 2, 2, 2]
    assert saguaro.uniform_fanout(10, 3) == [3, 3, 2, 2]
    for a, r in ((0.8, 1.0), (0.5, 0.5), (0.95, 3.0)):
        f = saguaro.geometric_fanout(24, 7, a, r)
        assert sum(f) == 24 and min(f) >= 1 and len(f) == 8
        assert all(x >= y for x, y in itertools.pairwise(f[:-1]))  # non-increasing for k < n
    # Theorem 12 before rounding: F_n / F_{n-1} = a^(1/(1+r)) (1-a)^(-1/(1+r)) > 1 for a = 0.8
    f = saguaro.geometric_fanout(60, 3, 0.8, 1.0)
    assert f[3] > f[2]
    with pytest.raises(ValueError, match="budget"):
        saguaro.check_budget(3, 3)
    for c in (0, -0.5, 1.5, math.nan, True):
        with pytest.raises(ValueError, match="saguaro_c"):
            saguaro.check_saguaro_c(c)


def test_fork_rank_and_saguaro_reshape():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 9.0, 8.0, 7.0, 6.0]])
    cands = saguaro.fork_candidates(scores, [0, 4], [2, 2, 3])
    assert cands == [[1, 2], [3, 2], [1, 2, 3]]  # own draft token excluded at k < n
    for k, own in ((0, 0), (1, 4), (2, None)):
        for t in range(5):
            if t == own:
                continue
            r = saguaro.bonus_rank(scores[k], t, own)
            assert (t in saguaro.fork_candidates(scores, [0, 4], [r] * 3)[k]) and (
                r == 1 or t not in saguaro.fork_candidates(scores, [0, 4], [r - 1] * 3)[k]
            )
    q = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0], dtype=torch.float64)
    qs = saguaro.saguaro_reshape(q, 2, 0.1)
    expect = torch.tensor([0.05, 0.03, 0.1, 0.1, 0.0], dtype=torch.float64) / 0.28
    assert torch.allclose(qs, expect) and qs[4] == 0
    assert saguaro.saguaro_reshape(q, 2, 1.0) is q
    est = saguaro.FanoutEstimator(min_obs=4)
    for rank in (1, 1, 2, 1, 3, 1, 5, 2):
        est.observe(2, 3, rank)
    assert 0 < est.accept_rate < 1 and 0.1 <= est.power_law_r(6) <= 10


def test_cost_model():
    assert ssd_speedup(1.0, 3.0, 1.5, 0.8, 0.5) == pytest.approx(3.0)  # all hits, T_p <= 1: E_hit
    assert ssd_speedup(0.0, 3.0, 1.5, 0.8, 0.5) == pytest.approx(1.5 / 1.5)
    assert ssd_speedup(1.0, 3.0, 1.5, 2.0, 0.5) == pytest.approx(1.5)  # T_p > 1 is on the path
    # Corollary 8: with the SD draft as primary and backup, SSD beats SD whenever p_hit > 0.
    e_sd, t_sd = 2.5, 0.4
    for p in (0.1, 0.5, 0.9):
        s = ssd_speedup(p, e_sd, e_sd, 0.9, t_sd)
        assert s > sd_speedup(e_sd, t_sd)
        lo, hi = ssd_over_sd_bounds(p, e_sd, e_sd, t_sd)
        assert lo - 1e-12 <= s / sd_speedup(e_sd, t_sd) <= hi + 1e-12
    assert ssd_speedup(0.9, 3, 1, 0.5, 0.2, batch_size=8) < ssd_speedup(0.9, 3, 1, 0.5, 0.2)
    pred = predict(0.5, 3.0, 1.0, 0.01, 0.02, 0.02)
    assert pred.t_p == pytest.approx(0.5) and pred.tokens_per_second == pytest.approx(
        pred.speedup_vs_ar / 0.02
    )
    for kw, name in ((dict(p_hit=1.5), "p_hit"), (dict(t_p=-1), "t_p"), (dict(e_hit=math.inf), "e_hit")):
        args = dict(p_hit=0.5, e_hit=2.0, e_miss=1.0, t_p=0.5, t_b=0.5) | kw
        with pytest.raises(ValueError, match=name):
            ssd_speedup(**args)


def _draft_lm_pair():
    from hierspec.models.draft import DraftConfig, DraftLM

    cfg = DraftConfig(vocab_size=16, n_vocab=12, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_length=128)
    vm = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15])
    d1 = DraftLM(cfg, vm, dtype=torch.float64, seed=3)
    with torch.no_grad():
        d1.embed.weight.mul_(40.0)  # peaked rows, so branches differ
    d2 = DraftLM(cfg, vm, dtype=torch.float64)
    d2.load_state_dict(d1.state_dict())
    return d1, d2


@pytest.mark.parametrize("kind", ["tiny", "draft-lm"])
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_tree_decode_equals_sequential_branches(temp, kind):
    """The batched tree decode draws the same branch drafts, from the same q' rows, as decoding
    each branch on its own (float64), round after round (TinyGPT and DraftLM drafts)."""
    if kind == "tiny":
        _, d1 = make_tiny_pair(vocab_size=16, seed=5, dtype=torch.float64)
        d2 = TinyGPT(d1.config, dtype=torch.float64)
    else:
        d1, d2 = _draft_lm_pair()
    opts = SSDOptions(
        gamma=3,
        budget=9,
        saguaro_c=0.5,
        fanout="geometric",
        params=SamplingParams(temperature=temp),
        seed=4,
        max_new_tokens=40,
    )
    tree, seq = Speculator(d1), Speculator(d2, tree=False)
    assert tree.tree and not seq.tree
    for sp in (tree, seq):
        sp.start([1, 2, 3, 4], opts)
    key, hits = None, 0
    for _ in range(8):
        pa, pb = tree.serve(key), seq.serve(key)
        assert pa.tokens == pb.tokens and pa.status == pb.status
        hits += pa.status == "hit"
        tree.build()
        seq.build()
        assert tree.cache.keys() == seq.cache.keys() and len(tree.cache) >= 4
        for kt, (toks, rows) in tree.cache.items():
            assert toks == seq.cache[kt][0]
            assert (rows is None) == (temp == 0) and (rows is None or torch.allclose(rows, seq.cache[kt][1]))
        k, t = next(iter(sorted(tree.cache)))  # steer into a cached outcome
        key = (k, t)
    assert hits >= 7


def test_draft_spec_uses_the_one_loader_and_tree_needs_decode_branches(tmp_path):
    """SSD re-creates file drafts with `load_draft_model` (dtype honoured; early-exit heads refused
    up front), and batched tree decode is a model method (`BranchDecoder`), not a type switch."""
    import pickle

    from hierspec.models.draft import FORMAT_DRAFT, DraftLM, TargetIdentity, write_safetensors
    from hierspec.models.early_exit import FORMAT_EARLY_EXIT
    from hierspec.ssd import DraftSpec, build_draft_model
    from hierspec.ssd.draft_spec import check_draft_spec

    d1, _ = _draft_lm_pair()
    path = tmp_path / "d.safetensors"
    d1.save(path, TargetIdentity(vocab_size=16))
    spec = pickle.loads(pickle.dumps(DraftSpec(path, torch.float64)))
    m = build_draft_model(spec)
    assert isinstance(m, DraftLM) and m.dtype == torch.float64
    assert build_draft_model(str(path)).dtype == torch.float32
    head = tmp_path / "head.safetensors"
    write_safetensors(head, {"w": torch.zeros(2)}, {"format": FORMAT_EARLY_EXIT})
    with pytest.raises(ValueError, match="early-exit head"):
        check_draft_spec(str(head))
    with pytest.raises(ValueError, match="dtype"):
        DraftSpec(path, torch.int64)
    assert FORMAT_DRAFT == "hierspec.draft"

    class NoBranches:  # a LanguageModel without decode_branches: sequential branches only
        def __init__(self, model):
            self.m = model
            self.vocab_size, self.max_length = model.vocab_size, model.max_length

        def __getattr__(self, name):
            if name in ("decode_branches", "branch_state", "supports_branches"):
                raise AttributeError(name)
            return getattr(self.m, name)

    plain = NoBranches(make_tiny_pair(vocab_size=16, seed=5, dtype=torch.float64)[1])
    assert not Speculator(plain).tree
    with pytest.raises(ValueError, match="decode_branches"):
        Speculator(plain, tree=True)


# ------------------------------------------------------------------- greedy identity, local == process
@pytest.fixture(scope="module")
def pair32():
    return make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)


def test_greedy_identity_and_local_equals_process(pair32):
    target, draft = pair32
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    ref = plain_greedy(target, prompt, 40)
    greedy = SamplingParams(temperature=0)
    configs = [
        dict(gamma=3, fallback="jit"),
        dict(gamma=4, fallback="fast", fanout="geometric", budget=7),
        dict(gamma=2, fallback="fast", fast_backup="random", force_miss=True),
        dict(gamma=1, budget=2),
    ]
    sampled = dict(
        gamma=3,
        params=SamplingParams(temperature=1.0, top_p=0.95),
        max_new_tokens=30,
        saguaro_c=0.5,
        fanout="geometric",
        seed=7,
    )
    outs = {}
    for mode in ("local", "process"):
        with SSDSession(target, draft, mode=mode) as s:
            for cfg in configs:
                out = s.generate(prompt, params=greedy, max_new_tokens=40, **cfg)
                assert out.token_ids == ref, (mode, cfg)
                st = out.stats
                assert st.num_generated_tokens == 40 and not st.fallback_events
                if cfg.get("force_miss"):
                    # every drafted round (the cold start and each miss) is served by the fast
                    # fallback; a round with no draft happens at most once, at the very end, and
                    # whether it happens depends on where the random fallback drafts end the run
                    assert st.num_hits == 0 and st.num_fallback_fast == st.rounds_on_miss
                    assert st.rounds_on_miss == st.num_misses + st.num_cold_starts
                    assert st.num_rounds - st.rounds_on_miss in (0, 1)
                else:
                    assert st.num_hits > 0 and st.hit_rate > 0.3
            outs[mode] = s.generate(prompt, **sampled).token_ids
            if mode == "process":
                assert s.speculator_pid is not None
    assert outs["local"] == outs["process"]  # same seed, same RNG order: identical tokens


def test_stop_strings_and_eos_match_the_engine(pair32):
    """SSD commits through the engine's `hierspec.output.Output`: at temperature 0 a stop string
    or an EOS ends it exactly where `generate` ends (same tokens, text, finish reason, stream)."""
    from hierspec.engine import generate
    from test_engine import CharTokenizer

    target, draft = pair32
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    greedy = SamplingParams(temperature=0)
    tok = CharTokenizer()
    full = generate(target, prompt, params=greedy, max_new_tokens=30, tokenizer=tok)
    stop = full.text[9:11]
    eos = full.token_ids[12]
    cases = [dict(stop_strings=[stop]), dict(eos_token_id=eos), dict(stop_strings=["zzz"], eos_token_id=[99])]
    for mode in ("local", "process"):
        with SSDSession(target, draft, mode=mode) as s:
            for kw in cases:
                ref = generate(target, prompt, params=greedy, max_new_tokens=30, tokenizer=tok, **kw)
                seen: list[int] = []
                out = s.generate(
                    prompt,
                    gamma=3,
                    params=greedy,
                    max_new_tokens=30,
                    tokenizer=tok,
                    on_tokens=seen.extend,
                    **kw,
                )
                assert (out.token_ids, out.text, out.finish_reason) == (
                    ref.token_ids,
                    ref.text,
                    ref.finish_reason,
                )
                assert seen == out.token_ids
            assert out.finish_reason == "length" and len(out.token_ids) == 30
    assert ref.finish_reason == "length"
    with SSDSession(target, draft, mode="local") as s:
        out = s.generate(
            prompt, gamma=3, params=greedy, max_new_tokens=30, tokenizer=tok, stop_strings=[stop]
        )
        assert out.finish_reason == "stop" and out.text == full.text[: full.text.index(stop) + len(stop)]
        assert tok.decode(out.token_ids) == out.text
        with pytest.raises(ValueError, match="stop_strings: a tokenizer"):
            s.generate(prompt, stop_strings=[stop])
        with pytest.raises(ValueError, match="stop_strings: expected a list"):
            s.generate(prompt, stop_strings=stop, tokenizer=tok)


# ------------------------------------------------------------------- chi² through two processes
@pytest.fixture(scope="module")
def small_pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


@pytest.fixture(scope="module")
def chi2_session(small_pair):
    target, draft = small_pair
    with SSDSession(target, draft, mode="process") as s:
        yield s


def ssd_counts(session, prompt, n_tok, n, seed, **kw):
    v = session.target.vocab_size
    counts = np.zeros((v,) * n_tok)
    agg = {"hits": 0, "misses": 0, "jit": 0, "fast": 0}
    for i in range(n):
        out = session.generate(prompt, max_new_tokens=n_tok, seed=seed * 100_000 + i, **kw)
        counts[tuple(out.token_ids)] += 1
        st = out.stats
        agg["hits"] += st.num_hits
        agg["misses"] += st.num_misses
        agg["jit"] += st.num_fallback_jit
        agg["fast"] += st.num_fallback_fast
        assert not st.fallback_events
    return counts, agg


# The prompt is fixed, so the k = 0 residual is too: F_0 >= 2 keeps hits frequent (with F_0 = 1 the
# single candidate can have zero residual mass and never hit).
CHI2_CASES = [  # (temperature, C, fallback, extra)
    (0.7, 1.0, "jit", dict(gamma=2, budget=6)),
    (1.0, 0.5, "fast", dict(gamma=2, budget=5, fanout="geometric")),
    (0.7, 0.1, "jit", dict(gamma=1, budget=4)),
    (1.0, 0.1, "fast", dict(gamma=2, budget=3, fast_backup="random", force_miss=True)),
]


@pytest.mark.parametrize("temp,c,fallback,extra", CHI2_CASES)
def test_ssd_exact_chi2_two_processes(chi2_session, temp, c, fallback, extra):
    prompt = [1, 3]
    params = SamplingParams(temperature=temp)
    joint = exact_joint(chi2_session.target, prompt, 3, params)
    counts, agg = ssd_counts(
        chi2_session, prompt, 3, N_CHI2, 1, params=params, saguaro_c=c, fallback=fallback, **extra
    )
    assert chi2_p(counts, joint) > 1e-3
    assert agg[fallback] > 0 and agg["misses"] > 0
    if extra.get("force_miss"):
        assert agg["hits"] == 0
    else:
        assert agg["hits"] > N_CHI2 // 20  # the cache path is exercised (measured ~N/6)


def test_negative_control_unmodified_q_fails(chi2_session):
    """Sampling from Saguaro's q' but verifying against the unmodified q is detected."""
    prompt = [1, 3]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(chi2_session.target, prompt, 3, params)
    chi2_session._report_unmodified_q = True  # the private test hook (not a generate option)
    try:
        counts, _ = ssd_counts(
            chi2_session, prompt, 3, N_NEGATIVE, 1, params=params, saguaro_c=0.1, gamma=2, budget=3
        )
    finally:
        del chi2_session._report_unmodified_q
    assert chi2_p(counts, joint) < 1e-3
    with pytest.raises(TypeError, match="report_unmodified_q"):
        chi2_session.generate(prompt, report_unmodified_q=True)  # no longer a public switch


# ------------------------------------------------------------------- faults
def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting reaping is gone too
        return f.read().split()[2] == "Z"


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_speculator_fault_mid_generation(pair32, how):
    target, draft = pair32
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    ref = plain_greedy(target, prompt, 40)
    with SSDSession(target, draft, reply_timeout_s=1.0, fault_fallback="sd" if how == "kill" else "ar") as s:
        pid = s.speculator_pid
        seen = []

        def on_tokens(step):
            seen.extend(step)
            if len(seen) >= 8 and not s.faulted and len(seen) - len(step) < 8:
                os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)

        out = s.generate(
            prompt, gamma=3, params=SamplingParams(temperature=0), max_new_tokens=40, on_tokens=on_tokens
        )
        assert out.token_ids == ref and len(out.token_ids) == 40 and out.finish_reason == "length"
        st = out.stats
        assert s.faulted and len(st.fallback_events) == 1 and "continued alone" in st.fallback_events[0]
        assert st.num_local_rounds > 0 and st.num_rounds > st.num_local_rounds
        again = s.generate(prompt, gamma=3, params=SamplingParams(temperature=0), max_new_tokens=10)
        assert again.token_ids == ref[:10] and again.stats.fallback_events
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


# ------------------------------------------------------------------- emulated latency, stats
def test_emulated_mode_stats(pair32):
    target, draft = pair32
    with SSDSession(target, draft) as s:
        out = s.generate(
            [1, 2, 3],
            gamma=3,
            budget=4,
            params=SamplingParams(temperature=0.7),
            max_new_tokens=24,
            emulate_verify_ms=15,
            seed=0,
        )
    st = out.stats
    assert len(out.token_ids) == 24
    assert st.time_emulated >= 0.015 * st.num_rounds * 0.9
    assert st.t_v >= 0.015 and st.t_p > 0 and st.num_builds > 0
    assert st.hit_rate_per_k and 0 <= st.bonus_accuracy <= 1 and st.e_hit >= 1
    d = st.to_dict()
    for key in (
        "hit_rate",
        "hit_rate_per_k",
        "bonus_accuracy",
        "e_hit",
        "e_miss",
        "t_p_over_t_v",
        "predicted_tokens_per_second",
        "mean_acceptance_length",
        "fallback_events",
    ):
        assert key in d
    assert d["predicted_tokens_per_second"] > 0


# ------------------------------------------------------------------- bad input, no process left
def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_bad_input_before_start(pair32, tmp_path):
    target, draft = pair32
    before = _children()
    p = [1, 2, 3]
    with pytest.raises(ValueError, match="budget"):
        generate_ssd(target, draft, p, gamma=4, budget=4)
    for c in (0.0, 1.5):
        with pytest.raises(ValueError, match="saguaro_c"):
            generate_ssd(target, draft, p, saguaro_c=c)
    with pytest.raises(ValueError, match="fanout"):
        generate_ssd(target, draft, p, fanout="cubic")
    with pytest.raises(ValueError, match="fallback"):
        generate_ssd(target, draft, p, fallback="slow")
    with pytest.raises(ValueError, match="emulate_verify_ms"):
        generate_ssd(target, draft, p, emulate_verify_ms=-1, mode="local")
    with pytest.raises(ValueError, match=r"draft: .* does not exist"):
        generate_ssd(target, str(tmp_path / "missing.safetensors"), p)
    other = TinyGPT(TinyGPTConfig(vocab_size=7), dtype=torch.float64)
    with pytest.raises(ValueError, match="draft: its vocabulary has 7"):
        generate_ssd(target, other, p)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="draft: the speculator process could not start: DraftFileError"):
        generate_ssd(target, functools.partial(load_draft, str(bad)), p)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        with pytest.raises(RuntimeError, match="port: cannot listen"):
            generate_ssd(target, draft, p, port=sock.getsockname()[1])
    assert _children() <= before


def test_cli_flags(tmp_path):
    import argparse

    from hierspec.ssd.arguments import add_ssd_arguments, ssd_summary_lines
    from hierspec.ssd.stats import SSDStats

    ap = argparse.ArgumentParser()
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--draft", default=None)
    add_ssd_arguments(ap)
    draft = tmp_path / "d.safetensors"
    draft.write_bytes(b"x")
    args = ap.parse_args(
        ["--draft", str(draft), "--fanout", "geometric", "--budget", "9", "--saguaro-c", "0.5"]
    )
    assert args.fallback == "jit" and args.emulate_verify_ms == 0.0
    with pytest.raises(SystemExit):
        ap.parse_args(["--fallback", "slow"])
    assert any("hit rate" in line for line in ssd_summary_lines(SSDStats()))
