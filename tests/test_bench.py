"""Benchmark harness on tiny models: the matrix end to end (report.md, results.json, PNGs), bad
input (exit 2, nothing written), the exact expected acceptance, and the engine's on_verify hook."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from factories import tiny_hf
from hierspec import cli
from hierspec.bench import harness
from hierspec.bench.harness import BenchConfig, BenchError, MethodSpec, run_bench
from hierspec.drafters import ModelDrafter, NgramDrafter
from hierspec.engine import generate
from hierspec.models import make_tiny_pair
from hierspec.sampling import SamplingParams
from hierspec.verify import RULES

PNGS = (
    "speedup_by_category.png",
    "acceptance_vs_gamma.png",
    "per_position_acceptance.png",
    "time_breakdown.png",
)


class FakeTokenizer:
    """Characters -> ids in [3, vocab); chat prompts get a 1 ... 1 frame. eos = 2."""

    eos_token_id = 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % (self.vocab_size - 3) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [1, *self(messages[0]["content"])["input_ids"][:40], 1]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def write_specbench(path: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    recs = [
        {"question_id": 1, "category": "qa", "turns": ["Who wrote the the the the the play?"]},
        {"question_id": 2, "category": "qa", "turns": ["What is a cat? A cat is a cat is a cat."]},
        {"question_id": 3, "category": "math_reasoning", "turns": ["1+1=2, 2+2=4, 3+3=6, 4+4=?"]},
        {"question_id": 4, "category": "math_reasoning", "turns": ["Count: 1 2 3 1 2 3 1 2 3"]},
    ]
    lines = [json.dumps(r) for r in recs]
    lines[2:2] = list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_llama(layers: int, seed: int):
    return tiny_hf(seed=seed, num_hidden_layers=layers, max_position_embeddings=256)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(target HFModel, draft directory) of tiny Llamas sharing a 64-token vocabulary."""
    from hierspec.models import HFModel

    target = HFModel(tiny_llama(2, 0))
    draft_dir = tmp_path_factory.mktemp("draft") / "tiny-draft"
    tiny_llama(1, 0).save_pretrained(draft_dir)
    return target, draft_dir


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a bad-input case gets as far as loading a model."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("hierspec.models.load_smollm2", boom)
    monkeypatch.setattr("hierspec.models.open.open_target", boom)
    monkeypatch.setattr("hierspec.models.loading.load_draft_model", boom)


# ------------------------------------------------------------------------------ end to end
def test_cli_matrix_end_to_end(tmp_path, monkeypatch, capsys, llama_pair):
    target, draft_dir = llama_pair
    monkeypatch.setattr("hierspec.models.load_smollm2", lambda dtype: (target, FakeTokenizer(64)))
    sb = write_specbench(tmp_path / "question.jsonl")
    out = tmp_path / "out" / "quick"
    methods = f"ar,ngram,draft:{draft_dir},hf-ngram,hf-draft:{draft_dir}"
    argv = ["bench", "--out", str(out), "--sets", f"specbench:{sb}", "--n", "2", "--methods", methods]
    argv += ["--rules", "token,block", "--temperatures", "0,1.0", "--gammas", "2,3"]
    argv += ["--max-new-tokens", "12", "--warmup", "1", "--no-progress", "--backend", "torch"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "speed-up (totals)" in stdout and "harness overhead" in stdout
    for name in ("report.md", "results.json", *PNGS):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    # cells: T=0: ar + 4 drafting methods x 2 gammas; T=1: ar + 2 hierspec x 2 gammas x 2 rules + 2 HF x 2
    assert len(res["cells"]) == 9 + 13
    assert len(res["rows"]) == 4 * 22 and not res["errors"]
    assert {r["category"] for r in res["rows"]} == {"qa", "math_reasoning"}
    greedy_hs = [r for r in res["rows"] if r["temperature"] == 0 and r["kind"] in ("ngram", "draft")]
    assert greedy_hs and all(r["identical_to_ar"] for r in greedy_hs)
    hf = [r for r in res["rows"] if r["kind"].startswith("hf-")]
    assert all(r["new_tokens"] > 0 and r["target_forwards"] >= 1 for r in hf)
    assert all(r["draft_forwards"] > 0 for r in hf if r["kind"] == "hf-draft")
    law_rows = [r for r in res["rows"] if "expected_accepted" in r]
    assert law_rows and all(r["temperature"] > 0 and r["kind"] in ("ngram", "draft") for r in law_rows)
    summ = {(s["category"], s["label"], s["temperature"]): s for s in res["summary"]}
    assert ("all", "ar", 0.0) in summ and summ[("all", "ar", 0.0)]["speedup_total"] == pytest.approx(1.0)
    s = summ[("all", "draft:tiny-draft/block/γ3", 1.0)]
    assert 1.0 <= s["mean_acceptance_length"] <= 4.0 and len(s["per_position_acceptance"]) == 3
    assert set(s["time_ms_per_token"]) == set(harness.TIME_COMPONENTS)
    t = res["timing"]
    assert t["generation_calls_s"] > 0 and 0 <= t["harness_overhead_pct"] < 100
    md = (out / "report.md").read_text()
    for text in (
        "get_cpu_capability",
        "Harness overhead",
        "Category: qa",
        "Category: math_reasoning",
        "Exact expected acceptance",
        "ru_maxrss",
        "transformers",
        *PNGS,
    ):
        assert text in md, text
    assert not list(out.glob(".*.tmp"))


def test_run_bench_tiny_gpt_pair(tmp_path):
    """make_tiny_pair target (no transformers model): hierspec methods only, plus a sanity check
    that the exact expected acceptance is in line with what was measured."""
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=256)
    path = str(tmp_path)
    cfg = BenchConfig(
        out=tmp_path / "o",
        methods=[
            MethodSpec("ar", "ar"),
            MethodSpec("ngram", "ngram"),
            MethodSpec(f"draft:{path}", "draft", path),
        ],
        rules=["token", "hsd"],
        temperatures=[1.0],
        gammas=[4],
        max_new_tokens=24,
        warmup=0,
    )
    prompts = harness.load_prompts(replace_sets(cfg, write_specbench(tmp_path / "q.jsonl")))
    res = run_bench(cfg, target, FakeTokenizer(32), prompts, drafts={path: draft}, progress=False)
    rows = [r for r in res["rows"] if r["kind"] == "draft"]
    assert len(rows) == 4 * 2
    exp = sum(r["expected_accepted"] for r in rows)
    meas = sum(r["num_accepted_draft_tokens"] for r in rows)
    sd = sum(r["expected_accepted_var"] for r in rows) ** 0.5
    assert sd > 0 and abs(meas - exp) < 5 * sd + 1
    with pytest.raises(BenchError, match="transformers target"):
        run_bench(
            BenchConfig(out=tmp_path, methods=[MethodSpec("hf-ngram", "hf-ngram")]),
            target,
            FakeTokenizer(32),
            prompts,
            progress=False,
        )


def replace_sets(cfg: BenchConfig, specbench: Path) -> BenchConfig:
    cfg.sets = [f"specbench:{specbench}"]
    return cfg


# ------------------------------------------------------------------------------ exact law
def test_expected_acceptance_is_sum_of_laws(tmp_path):
    """Spot check: the harness's E[accepted] equals the sum of RULES[rule].law over the drafts of
    an independent replay of the same seeded generation."""
    target, draft = make_tiny_pair(vocab_size=32, seed=5, dtype=torch.float64, max_length=256)
    path = str(tmp_path)
    cfg = BenchConfig(out=tmp_path, temperatures=[0.8], gammas=[3], max_new_tokens=30, warmup=0)
    runner = harness.Runner(cfg, target, None, {path: draft})
    ids = [1, 5, 7, 5, 7, 5, 2, 9]
    for method, rule in (
        (MethodSpec(f"draft:{path}", "draft", path), "block"),
        (MethodSpec("ngram", "ngram"), "token"),
    ):
        cell = harness.Cell(method, 0.8, 3, rule)
        row = runner.run(cell, ids, seed=11, max_new_tokens=30, analyse=True)
        seen: list[dict] = []
        drafter = ModelDrafter(draft) if method.kind == "draft" else NgramDrafter()
        res = generate(
            target,
            ids,
            drafter=drafter,
            rule=rule,
            gamma=3,
            params=SamplingParams(temperature=0.8),
            max_new_tokens=30,
            seed=11,
            on_verify=seen.append,
        )
        assert res.token_ids == row["token_ids"]
        total, steps = 0.0, 0
        for d in seen:
            k = d["draft_tokens"].shape[1]
            if not k:
                continue
            q = None if d["draft_probs"] is None else d["draft_probs"][0]
            law = RULES[rule].law(d["draft_tokens"][0], q, d["target_rows"][0])
            total += float((law.sum(-1) * torch.arange(k + 1, dtype=law.dtype)).sum())
            steps += 1
        assert steps == row["law_steps"] > 0
        assert row["expected_accepted"] == pytest.approx(total, rel=1e-9, abs=1e-9)
        assert row["num_accepted_draft_tokens"] == res.stats.num_accepted_draft_tokens
        assert row["time_analysis_s"] > 0 and row["time_s"] == pytest.approx(
            row["time_call_s"] - row["time_analysis_s"]
        )
    runner.close()


# ------------------------------------------------------------------------------ engine hook
def test_on_verify_hook():
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    kw = dict(rule="block", gamma=4, params=SamplingParams(temperature=1.0), max_new_tokens=30, seed=7)
    seen: list[dict] = []
    res = generate(target, prompt, drafter=ModelDrafter(draft), on_verify=seen.append, **kw)
    ref = generate(target, prompt, drafter=ModelDrafter(draft), **kw)
    assert res.token_ids == ref.token_ids  # the hook changes nothing
    s = res.stats
    assert len(seen) == s.num_target_forwards
    assert sum(d["num_accepted"] for d in seen) == s.num_accepted_draft_tokens
    for d in seen:
        assert set(d) == {"draft_tokens", "draft_probs", "target_rows", "num_accepted"}
        k = d["draft_tokens"].shape[1]
        assert d["target_rows"].shape == (1, k + 1, 32)
        assert torch.allclose(d["target_rows"].sum(-1), torch.ones(1, k + 1, dtype=torch.float64))
        assert d["draft_probs"] is None if k == 0 else d["draft_probs"].shape == (1, k, 32)
        assert 0 <= d["num_accepted"] <= k
    # greedy n-gram: deterministic drafts (None) and raw logits rows
    seen.clear()
    res = generate(
        target,
        prompt,
        drafter=NgramDrafter(),
        gamma=3,
        params=SamplingParams(temperature=0),
        max_new_tokens=20,
        on_verify=seen.append,
    )
    assert len(seen) == res.stats.num_target_forwards
    assert all(d["draft_probs"] is None for d in seen)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--methods", "ar,beam"], "unknown method 'beam'"),
        (["--methods", "draft:/no/such/dir"], "does not exist"),
        (["--methods", "hf-draft"], "needs a draft model path"),
        (["--sets", "poetry"], "unknown prompt set 'poetry'"),
        (["--rules", "block,fast"], "unknown rule"),
        (["--gammas", "0"], "--gammas"),
        (["--temperatures", "0,hot"], "--temperatures"),
        (["--n", "0"], "--n must be"),
        (["--sets", "specbench:/no/such/question.jsonl"], "not found"),
    ],
)
def test_bad_input_exit_2(tmp_path, capsys, no_model_load, extra, msg):
    out = tmp_path / "out"
    assert cli.main(["bench", "--out", str(out), *extra]) == 2
    o, err = capsys.readouterr()
    assert o == "" and err.startswith("hierspec: error:") and msg in err, err
    assert not out.exists()


def test_bad_specbench_line_reports_line_number(tmp_path, capsys, no_model_load):
    sb = write_specbench(tmp_path / "q.jsonl", ('{"question_id": 9, "category": "qa"',))
    out = tmp_path / "out"
    assert cli.main(["bench", "--out", str(out), "--sets", f"specbench:{sb}"]) == 2
    err = capsys.readouterr().err
    assert f"{sb}:3: malformed Spec-Bench line" in err and "exit" not in err
    assert not out.exists()


def test_bad_specbench_line_skipped(tmp_path, capsys, monkeypatch):
    target, _ = make_tiny_pair(vocab_size=64, seed=1, dtype=torch.float32, max_length=256)
    monkeypatch.setattr("hierspec.models.load_smollm2", lambda dtype: (target, FakeTokenizer(64)))
    sb = write_specbench(tmp_path / "q.jsonl", ("not json",))
    out = tmp_path / "out"
    argv = [
        "bench",
        "--out",
        str(out),
        "--sets",
        f"specbench:{sb}",
        "--on-error",
        "skip",
        "--methods",
        "ar,ngram",
    ]
    argv += [
        "--temperatures",
        "0",
        "--gammas",
        "2",
        "--max-new-tokens",
        "6",
        "--warmup",
        "0",
        "--no-progress",
        "--backend",
        "torch",
    ]
    assert cli.main(argv) == 0
    assert f"{sb}:3" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert len({r["prompt_id"] for r in res["rows"]}) == 4


def test_unwritable_output_dir(tmp_path, capsys, no_model_load):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert cli.main(["bench", "--out", str(blocker / "sub")]) == 2
    assert "not a directory" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if not writable:  # root ignores permission bits; the file case above still ran
            assert cli.main(["bench", "--out", str(ro / "out")]) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_quick_preset_and_overrides(tmp_path):
    args = harness.build_parser().parse_args(["--quick", "--out", str(tmp_path), "--gammas", "2,4"])
    cfg = harness.config_from_args(args)
    assert cfg.sets == ["code", "chat"] and cfg.n == 3 and cfg.max_new_tokens == 64
    assert cfg.temperatures == [0.0, 1.0] and cfg.rules == ["block"] and cfg.gammas == [2, 4]
    assert [m.name for m in cfg.methods] == ["ar", "ngram", "hf-ngram"] and cfg.dtype == "float32"
    labels = [c.label for c in harness.plan_cells(cfg)]
    assert labels == [
        "ar",
        "ngram/γ2",
        "ngram/γ4",
        "hf-ngram/γ2",
        "hf-ngram/γ4",
        "ar",
        "ngram/block/γ2",
        "ngram/block/γ4",
        "hf-ngram/γ2",
        "hf-ngram/γ4",
    ]
    args = harness.build_parser().parse_args(["--out", str(tmp_path), "--methods", "ngram"])
    assert [m.kind for m in harness.config_from_args(args).methods] == ["ar", "ngram"]  # AR added


def test_planned_hierarchy_and_hf_assisted_cells(tmp_path):
    """The planned stack runs once, at its planner's lengths (γplan); HF assisted generation also
    runs at γ auto (its own defaults), prompt lookup only at fixed lengths."""
    cal = tmp_path / "cal.json"
    cal.write_text("{}")
    methods = f"hierarchy:plan={cal},hf-draft:{tmp_path},hf-ngram"
    args = harness.build_parser().parse_args(
        ["--out", str(tmp_path / "o"), "--methods", methods, "--gammas", "auto,3,5", "--temperatures", "0"]
    )
    labels = [c.label for c in harness.plan_cells(harness.config_from_args(args))]
    name = tmp_path.name
    assert labels == [
        "ar",
        "hierarchy:plan/γplan",
        f"hf-draft:{name}/γauto",
        f"hf-draft:{name}/γ3",
        f"hf-draft:{name}/γ5",
        "hf-ngram/γ3",
        "hf-ngram/γ5",
    ]


# ------------------------------------------------------------------------------ new methods
def test_parse_self_speculation_and_hierarchy_methods(tmp_path):
    m = harness.parse_method("hispec")
    assert m.kind == "hispec" and m.exits == (4, 8) and (m.nd, m.ni) == (2, 4)
    m = harness.parse_method("hispec:4/8/3/6")
    assert m.exits == (4, 8) and (m.nd, m.ni) == (3, 6)
    assert harness.parse_method("early-exit").exits == (4,)
    assert harness.parse_method("hf-early-exit:6").exits == (6,)
    path = str(tmp_path)
    m = harness.parse_method(f"hierarchy:ngram+{path}@2+{path}")
    assert m.levels == (("ngram", 0), (path, 2), (path, 3)) and m.paths == [path, path]
    for bad, msg in [
        ("hispec:8/4", "must come before"),
        ("hispec:4", "2 or 4 integers"),
        ("hispec:3/8", "no shipped early-exit head at layer 3"),
        ("early-exit:x", "separated by"),
        (f"hierarchy:{path}+ngram", "only be the bottom"),
        ("hierarchy:ngram", "at least one draft model"),
        ("hierarchy:/nonexistent", "does not exist"),
        ("draft:", "give the draft model"),
    ]:
        with pytest.raises(BenchError, match=msg):
            harness.parse_method(bad)


def test_run_bench_self_speculation_and_hierarchy(tmp_path):
    """HiSpec, early exit and a 3-level hierarchy through the harness on a tiny HF Llama: greedy
    rows are identical to AR and carry the per-stage statistics."""
    pytest.importorskip("transformers")
    from hierspec.models import HFModel, build_early_exit

    hf = tiny_hf(seed=0, vocab_size=32, num_hidden_layers=4, max_position_embeddings=256)
    target = HFModel(hf)
    heads = {1: build_early_exit(hf, 1).head, 2: build_early_exit(hf, 2).head}
    _, small = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=256)
    path = str(tmp_path)
    cfg = BenchConfig(
        out=tmp_path / "o",
        methods=[
            MethodSpec("ar", "ar"),
            MethodSpec("hispec:1/2", "hispec", exits=(1, 2), nd=2, ni=3),
            MethodSpec("early-exit:1", "early-exit", exits=(1,)),
            MethodSpec("hierarchy", "hierarchy", levels=(("ngram", 0), (path, 2))),
        ],
        temperatures=[0.0, 1.0],
        rules=["block"],
        gammas=[3],
        max_new_tokens=12,
        warmup=0,
    )
    prompts = harness.load_prompts(replace_sets(cfg, write_specbench(tmp_path / "q.jsonl")))
    res = run_bench(
        cfg, target, FakeTokenizer(32), prompts, drafts={path: small}, heads=heads, progress=False
    )
    rows = res["rows"]
    ar = {r["prompt_id"]: r["token_ids"] for r in rows if r["kind"] == "ar" and r["temperature"] == 0}
    greedy = [r for r in rows if r["kind"] != "ar" and r["temperature"] == 0]
    assert {r["kind"] for r in greedy} == {"hispec", "early-exit", "hierarchy"}
    for r in greedy:
        assert r["token_ids"] == ar[r["prompt_id"]], r["method"]
    hs = [r for r in rows if r["kind"] == "hispec"]
    assert all(r["gamma"] == 3 and "intermediate_acceptance_rate" in r["stages"] for r in hs)
    from hierspec.bench.report import write_report

    files = write_report(res, tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert any(str(f).endswith("report.md") for f in files) and "hispec" in md and "hierarchy" in md
    with pytest.raises(BenchError, match="no early-exit head loaded"):
        run_bench(cfg, target, FakeTokenizer(32), prompts, drafts={path: small}, progress=False)


# ------------------------------------------------------------------------------ SSD rows
def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def _placement() -> tuple[set[int], int]:
    return set(os.sched_getaffinity(0)), torch.get_num_threads()


def test_parse_ssd_method_and_bad_options(tmp_path, capsys, no_model_load):
    """ssd:NAME/KEY=VALUE parsing; bad options are a ValueError (BenchError) before anything
    starts, and exit status 2 from the CLI before any model is loaded."""
    path = str(tmp_path)
    m = harness.parse_method(f"ssd:{path}/fanout=geometric/budget=16/c=0.5/fallback=fast/emulate=50")
    assert m.kind == "ssd" and m.path == path and m.paths == [path]
    assert m.ssd_kwargs == dict(
        fanout="geometric", budget=16, saguaro_c=0.5, fallback="fast", emulate_verify_ms=50.0
    )
    cell = harness.Cell(m, 0.0, 5, "greedy")
    assert cell.label == f"ssd:{tmp_path.name}/fanout=geometric/budget=16/c=0.5/fallback=fast/emulate=50/γ5"
    assert harness.parse_method(f"ssd:{path}").ssd == ()
    before = _children()
    for bad, msg in [
        ("ssd:", "give the draft model"),
        ("ssd", "needs a draft model"),
        ("ssd:/no/such/draft", "does not exist"),
        (f"ssd:{path}/fanout=cubic", "fanout=cubic: expected one of uniform, geometric"),
        (f"ssd:{path}/c=0", "c=0: expected a number in"),
        (f"ssd:{path}/budget=x", "budget='x' is not a valid number"),
        (f"ssd:{path}/fallback=slow", "expected one of jit, fast"),
        (f"ssd:{path}/emulate=-1", "emulate=-1"),
        (f"ssd:{path}/speed=9", "unknown SSD option 'speed'"),
        (f"ssd:{path}/c=0.5/c=0.7", "given twice"),
    ]:
        with pytest.raises(ValueError, match=msg):
            harness.parse_method(bad)
    # budget < gamma + 1: caught with the gammas, by run_bench before any speculator starts
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=64)
    cfg = BenchConfig(out=tmp_path / "o", methods=[harness.parse_method(f"ssd:{path}/budget=3")], gammas=[3])
    prompt = harness.Prompt(id="p", category="c", text="abc", chat=False)
    with pytest.raises(ValueError, match="with γ = 3: budget"):
        run_bench(cfg, target, FakeTokenizer(32), [prompt], drafts={path: draft}, progress=False)
    assert _children() <= before
    for methods, msg in ((f"ssd:{path}/budget=3", "budget"), (f"ssd:{path}/fanout=cubic", "fanout")):
        out = tmp_path / "out"
        argv = ["bench", "--out", str(out), "--methods", methods, "--gammas", "3"]
        assert cli.main(argv) == 2
        o, err = capsys.readouterr()
        assert o == "" and err.startswith("hierspec: error:") and msg in err, err
        assert not out.exists()


def test_run_bench_ssd_rows(tmp_path):
    """Two ssd: methods (one speculator process, shared) next to draft: with the same draft, greedy:
    SSD rows carry the SSD statistics, their tokens are AR's, the report shows the hit rate next to
    the speed-up, and afterwards no process is left and affinity / torch threads are as before."""
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    path = str(tmp_path)
    ssd_a = harness.parse_method(f"ssd:{path}/fanout=geometric/budget=6/c=0.5")
    ssd_b = harness.parse_method(f"ssd:{path}/fallback=fast")
    cfg = BenchConfig(
        out=tmp_path / "o",
        methods=[MethodSpec("ar", "ar"), MethodSpec(f"draft:{path}", "draft", path), ssd_a, ssd_b],
        temperatures=[0.0],
        gammas=[3],
        max_new_tokens=16,
        warmup=1,
    )
    prompts = harness.load_prompts(replace_sets(cfg, write_specbench(tmp_path / "q.jsonl")))[:1]
    before, place = _children(), _placement()
    res = run_bench(cfg, target, FakeTokenizer(32), prompts, drafts={path: draft}, progress=False)
    assert _children() <= before and _placement() == place
    assert res["ssd"]["sessions"] == 1 and res["timing"]["ssd_start_s"] > 0
    rows = res["rows"]
    ar = next(r for r in rows if r["kind"] == "ar")
    ssd_rows = [r for r in rows if r["kind"] == "ssd"]
    assert len(ssd_rows) == 2
    for r in ssd_rows:
        assert r["identical_to_ar"] is True and r["token_ids"] == ar["token_ids"]
        st = r["ssd"]
        assert st["num_predicted_rounds"] > 0 and 0 <= st["hit_rate"] <= 1 and not st["fallback_events"]
        assert st["e_hit"] >= 1 or st["e_miss"] >= 1
        assert st["t_v"] > 0 and st["predicted_speedup_vs_ar"] > 0
        assert r["mean_acceptance_length"] >= 1 and r["draft_forwards"] is None and r["tokens_per_s"] > 0
        assert set(r["times"]) == set(harness.TIME_COMPONENTS)
    assert ssd_rows[0]["ssd"]["options"]["budget"] in (6, 12)
    assert any(r["ssd"]["num_fallback_fast"] for r in ssd_rows if r["method"] == ssd_b.name)
    from hierspec.bench.report import format_summary, write_report

    write_report(res, tmp_path / "o")
    summ = [s for s in res["summary"] if s["kind"] == "ssd"]
    assert len(summ) == 2 and all(s["sd_label"] == f"draft:{tmp_path.name}/γ3" for s in summ)
    assert all(s["speedup_vs_sd"] > 0 and s["ssd"]["hit_rate"] is not None for s in summ)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Speculative speculative decoding (SSD)" in md
    assert "| speed-up vs AR (totals) | hit rate | vs sync SD, same draft |" in md
    assert "SSD (speculative speculative decoding)" in format_summary(res)


def test_run_bench_ssd_stops_speculator_on_error(tmp_path, monkeypatch):
    """A failing SSD generation: run_bench raises, the speculator is stopped and the bench's
    affinity and torch threads are restored."""
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=64)
    path = str(tmp_path)
    pids = []

    def boom(self, cell, *a):
        pids.append(self.ssd.session(cell.method).speculator_pid)
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.Runner, "_run_ssd", boom)
    cfg = BenchConfig(
        out=tmp_path / "o",
        methods=[MethodSpec("ar", "ar"), harness.parse_method(f"ssd:{path}")],
        temperatures=[0.0],
        gammas=[2],
        max_new_tokens=4,
        warmup=0,
    )
    prompt = harness.Prompt(id="p", category="c", text="abcabc", chat=False)
    before, place = _children(), _placement()
    with pytest.raises(RuntimeError, match="boom"):
        run_bench(cfg, target, FakeTokenizer(32), [prompt], drafts={path: draft}, progress=False)
    assert pids and pids[0] is not None and pids[0] not in _children()
    assert _children() <= before and _placement() == place


# ------------------------------------------------------------------------------ EAGLE rows
def test_run_bench_eagle_chain_and_tree(tmp_path):
    """eagle:PATH and eagle-tree:D/K/B:PATH through the harness on a tiny HF Llama: greedy rows
    are AR's tokens, tree cells have one 'tree' rule at T > 0, the report is written."""
    from hierspec.models import HFModel
    from hierspec.models.eagle import build_eagle_head, save_eagle

    hf = tiny_llama(2, 1)
    target = HFModel(hf)
    path = tmp_path / "eagle.safetensors"
    save_eagle(build_eagle_head(hf, torch.arange(64)), path, hf)
    chain = harness.parse_method(f"eagle:{path}")
    tree = harness.parse_method(f"eagle-tree:3/2/6:{path}")
    assert tree.tree == (3, 2, 6) and tree.head == str(path) and chain.head == str(path)
    cfg = BenchConfig(
        out=tmp_path / "o",
        methods=[MethodSpec("ar", "ar"), chain, tree],
        temperatures=[0.0, 1.0],
        rules=["block"],
        gammas=[3],
        max_new_tokens=12,
        warmup=0,
    )
    prompts = harness.load_prompts(replace_sets(cfg, write_specbench(tmp_path / "q.jsonl")))[:2]
    res = run_bench(cfg, target, FakeTokenizer(64), prompts, drafts={}, progress=False)
    rows = res["rows"]
    ar = {r["prompt_id"]: r["token_ids"] for r in rows if r["kind"] == "ar" and r["temperature"] == 0}
    greedy = [r for r in rows if r["kind"] != "ar" and r["temperature"] == 0]
    assert {r["kind"] for r in greedy} == {"eagle", "eagle-tree"}
    for r in greedy:
        assert r["token_ids"] == ar[r["prompt_id"]], r["method"]
    assert {r["rule"] for r in rows if r["kind"] == "eagle-tree" and r["temperature"] > 0} == {"tree"}
    from hierspec.bench.report import write_report

    write_report(res, tmp_path / "o")
    assert "eagle-tree" in (tmp_path / "o" / "report.md").read_text()
    with pytest.raises(BenchError, match="does not exist"):
        harness.parse_method("eagle:/nonexistent.safetensors")
    with pytest.raises(BenchError, match="eagle-tree"):
        harness.parse_method(f"eagle-tree:3/0/6:{path}")


# ------------------------------------------------------------------------------ long prompts
@pytest.mark.smollm
def test_llama_peers_past_n_batch_and_at_the_context_end(tmp_path):
    """llama-cpp-python's loops on a prompt longer than n_batch that leaves room for fewer tokens
    than asked (a small context and batch stand in for a long prompt, to keep the test short):
    llama-pld used to die in `Llama.eval` ("could not broadcast input array from shape (n*V,) into
    shape (0,)"); both now stop at the target's context end (200, which llama.cpp pads to 256), as
    hierspec AR does, with the same tokens. Every prompt of the long set has 700-1500 tokens."""
    pytest.importorskip("llama_cpp")
    from hierspec.bench.peers import llama_room
    from hierspec.models.catalog import resolve_model
    from hierspec.models.llamacpp import LlamaCppModel
    from hierspec.models.open import load_gguf_tokenizer
    from hierspec.prompts import encode_prompt

    path = resolve_model("smollm2-135m").path
    target, tok = LlamaCppModel(path, n_ctx=200, n_batch=64), load_gguf_tokenizer(path)
    long = [encode_prompt(tok, p) for p in harness.load_prompts(BenchConfig(out=tmp_path, sets=["long"]))]
    assert len(long) >= 4 and all(700 <= len(x) <= 1500 for x in long), [len(x) for x in long]
    peers = [MethodSpec("llama-ar", "llama-ar"), MethodSpec("llama-pld", "llama-pld")]
    cfg = BenchConfig(out=tmp_path, methods=peers, temperatures=[0.0], gammas=[3])
    runner = harness.Runner(cfg, target, tok.eos_token_id, {})
    ids = long[0][:197]  # room for 3 new tokens, 133 past n_batch
    rows = {}
    for cell in harness.plan_cells(cfg):
        rows[cell.method.kind] = row = runner.run(cell, ids, 0, 8, False)
        assert row["new_tokens"] == 3 and row["finish_reason"] == "length", cell.label
    assert rows["llama-pld"]["token_ids"] == rows["llama-ar"]["token_ids"]
    runner.close()
    assert llama_room(1024, 1000, 8) == 8 and llama_room(1024, 1020, 8) == 4
    with pytest.raises(ValueError, match="prompt of 1024 tokens fills"):
        llama_room(1024, 1024, 8)


@pytest.mark.smollm
def test_bench_smoke_long_prompts_with_peers(tmp_path, capsys):
    """The bench end to end on the real SmolLM2 GGUF with the long set (a 700-1500-token
    summarization prompt): hierspec and llama.cpp peers all finish, greedy rows equal AR's."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "out"
    argv = ["bench", "--out", str(out), "--sets", "long", "--n", "1", "--backend", "llama.cpp"]
    argv += ["--methods", "ar,ngram,llama-ar,llama-pld", "--temperatures", "0", "--gammas", "3"]
    argv += ["--max-new-tokens", "4", "--warmup", "0", "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert not res["errors"] and res["failed"] is None
    rows = res["rows"]
    assert sorted(r["label"] for r in rows) == ["ar", "llama-ar", "llama-pld/γ3", "ngram/γ3"]
    assert all(700 <= r["prompt_tokens"] <= 1500 and r["category"] == "summarization" for r in rows)
    assert all(r["new_tokens"] == 4 or r["finish_reason"] == "eos" for r in rows)
    assert all(r["identical_to_ar"] for r in rows if r["kind"] != "ar")


# ------------------------------------------------------------------------------ failures
def _tiny_bench_argv(out: Path, sb: Path, *extra: str) -> list[str]:
    argv = ["bench", "--out", str(out), "--sets", f"specbench:{sb}", "--methods", "ar,ngram"]
    argv += ["--temperatures", "0", "--gammas", "2", "--max-new-tokens", "4", "--no-progress"]
    return [*argv, "--backend", "torch", *extra]


def _fail_on_call(monkeypatch, k: int) -> None:
    """Runner.run raises on its k-th call (counting from 1)."""
    run, calls = harness.Runner.run, []

    def flaky(self, cell, *a, **kw):
        calls.append(cell.label)
        if len(calls) == k:
            raise RuntimeError("boom\nsecond line")
        return run(self, cell, *a, **kw)

    monkeypatch.setattr(harness.Runner, "run", flaky)


def test_failed_run_writes_finished_runs(tmp_path, capsys, monkeypatch):
    """--on-error raise: a generation that fails after others finished: exit status 1, one line
    on stderr naming the cell, the prompt and results.json, which holds the finished rows and the
    failure (with its traceback); report.md says the run was stopped."""
    target, _ = make_tiny_pair(vocab_size=64, seed=1, dtype=torch.float32, max_length=256)
    monkeypatch.setattr("hierspec.models.load_smollm2", lambda dtype: (target, FakeTokenizer(64)))
    _fail_on_call(monkeypatch, 4)  # warm-up ar, warm-up ngram, then timed: ar ok, ngram fails
    out = tmp_path / "out"
    sb = write_specbench(tmp_path / "q.jsonl")
    assert cli.main(_tiny_bench_argv(out, sb, "--warmup", "1")) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err[-1].startswith("hierspec: error: ngram/γ2 on prompt 1 failed (generate): RuntimeError: boom;")
    assert f"wrote the 1 finished runs and the failure to {out / 'results.json'}" in err[-1]
    assert not any("Traceback" in x for x in err)
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["ar"] and res["interrupted"] is False
    failed = res["failed"]
    assert failed["label"] == "ngram/γ2" and failed["prompt_id"] == "1" and failed["stage"] == "generate"
    assert failed["error"] == "RuntimeError: boom\nsecond line" and "Traceback" in failed["traceback"]
    md = (out / "report.md").read_text()
    assert "**Stopped by an error** (generate of `ngram/γ2` on prompt 1)" in md
    assert not list(out.glob(".*.tmp"))


def test_failed_warmup_writes_results_and_skip_goes_on(tmp_path, capsys, monkeypatch):
    """A failing warm-up: with raise, results.json records it (no runs finished); with skip, the
    warm-up failure is recorded and every timed run still happens."""
    target, _ = make_tiny_pair(vocab_size=64, seed=1, dtype=torch.float32, max_length=256)
    monkeypatch.setattr("hierspec.models.load_smollm2", lambda dtype: (target, FakeTokenizer(64)))
    sb = write_specbench(tmp_path / "q.jsonl")
    _fail_on_call(monkeypatch, 1)
    out = tmp_path / "raise"
    assert cli.main(_tiny_bench_argv(out, sb, "--warmup", "1", "--n", "1")) == 1
    assert "ar on prompt 1 failed (warmup)" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] == [] and res["failed"]["stage"] == "warmup"
    _fail_on_call(monkeypatch, 1)
    out = tmp_path / "skip"
    assert cli.main(_tiny_bench_argv(out, sb, "--warmup", "1", "--on-error", "skip")) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 4 * 2 and res["failed"] is None
    assert [(e["stage"], e["label"]) for e in res["errors"]] == [("warmup", "ar")]


def test_run_bench_error_carries_finished_rows(tmp_path, monkeypatch):
    """The library API: the original exception propagates, with the finished rows attached."""
    target, _ = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=64)
    _fail_on_call(monkeypatch, 2)
    cfg = BenchConfig(out=tmp_path, temperatures=[0.0], gammas=[2], max_new_tokens=4, warmup=0)
    prompt = harness.Prompt(id="p", category="c", text="abcabc", chat=False)
    with pytest.raises(RuntimeError, match="boom") as info:
        run_bench(cfg, target, FakeTokenizer(32), [prompt], progress=False)
    res = info.value.bench_results
    assert len(res["rows"]) == 1 and res["failed"]["label"] == "ngram/γ2"


def test_seeds_are_non_negative_and_warmups_distinct(tmp_path):
    cfg = BenchConfig(out=tmp_path, repeats=2, warmup=3)
    timed = {harness._seed(cfg, i, r) for i in range(5) for r in range(2)}
    warm = {harness._seed(cfg, 0, -1 - w) for w in range(3)}
    assert min(timed | warm) >= 0 and len(warm) == 3 and not timed & warm
    assert harness._seed(cfg, 1, 0) == 1  # timed seeds unchanged


def test_prompt_longer_than_a_draft_context(tmp_path, capsys):
    """A prompt that fits the target but not a draft: BenchError before any run (raise), or the
    prompt skipped for every method with a note (skip)."""
    target, _ = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=256)
    _, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float32, max_length=16)
    path = str(tmp_path)
    methods = [MethodSpec("ar", "ar"), MethodSpec(f"draft:{path}", "draft", path)]
    cfg = BenchConfig(
        out=tmp_path, methods=methods, temperatures=[0.0], gammas=[2], max_new_tokens=4, warmup=0
    )
    prompts = [
        harness.Prompt(id=i, category="c", text=t, chat=False) for i, t in (("a", "x" * 20), ("b", "y" * 8))
    ]
    with pytest.raises(
        BenchError,
        match=f"prompt a \\(c\\): 20 tokens exceed the context of the draft {path} \\(16 tokens\\)",
    ):
        run_bench(cfg, target, FakeTokenizer(32), prompts, drafts={path: draft}, progress=False)
    cfg.on_error = "skip"
    res = run_bench(cfg, target, FakeTokenizer(32), prompts, drafts={path: draft}, progress=False)
    assert {r["prompt_id"] for r in res["rows"]} == {"b"} and res["errors"][0]["prompt_id"] == "a"
    assert "skipping prompt a" in capsys.readouterr().err
