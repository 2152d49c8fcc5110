"""`hierspec.cache`: a damaged cache entry is rebuilt once, with one warning line, never trusted.

Part 1 checks the mechanism on small synthetic files; part 2 the SmolLM2 copy with a fake GGUF
loader (a tiny Llama + a character tokenizer: fast, no model package needed); part 3 (marked
``smollm``) one real rebuild of the real converted copy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hierspec import cache
from hierspec.cache import (
    CacheError,
    load_verified,
    read_json_cache,
    verified_dir,
    verified_file,
    verify,
    write_json_cache,
    write_manifest,
)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hierspec.cache" and r.levelno >= 30]


class Builder:
    """build(tmp) writes ``data`` (default: 100 bytes) and counts its calls."""

    def __init__(self, data: bytes = b"x" * 100, delay: float = 0.0) -> None:
        self.data, self.delay, self.calls = data, delay, 0

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        tmp.write_bytes(self.data)


# ---------------------------------------------------------------------------- 1. the mechanism
def test_file_is_built_once_with_a_manifest_and_no_temporaries(tmp_path, caplog) -> None:
    path, build = tmp_path / "c" / "curve.bin", Builder()
    assert verified_file(path, build) == path and build.calls == 1
    assert verified_file(path, build) == path and build.calls == 1  # valid: not rebuilt
    assert path.read_bytes() == build.data
    assert verify(path, directory=False, full=True) is None
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".curve.bin.lock",
        "curve.bin",
        "curve.bin.manifest.json",
    ]
    assert _warnings(caplog) == []  # a first build is not a repair: no warning


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(b"x" * 10), "10 bytes, expected 100"),  # truncated
        (lambda p: p.unlink(), "missing"),  # deleted (its manifest stays)
        (lambda p: p.write_bytes(b"y" * 100), "content differs"),  # same size, other bytes
        (lambda p: cache.manifest_path(p, False).unlink(), "no manifest"),  # made before manifests
        (lambda p: cache.manifest_path(p, False).write_text("{garbage"), "unreadable manifest"),
        (lambda p: cache.manifest_path(p, False).write_text('{"format": "x"}'), "foreign"),
    ],
    ids=["truncated", "deleted", "overwritten", "no-manifest", "garbage-manifest", "foreign-manifest"],
)
def test_a_damaged_file_is_rebuilt_with_one_warning(tmp_path, caplog, damage, reason) -> None:
    path, build = tmp_path / "curve.bin", Builder()
    verified_file(path, build)
    damage(path)
    assert reason in verify(path, directory=False)
    verified_file(path, build)
    assert build.calls == 2 and path.read_bytes() == build.data
    assert verify(path, directory=False, full=True) is None
    (msg,) = _warnings(caplog)
    assert str(path) in msg and reason in msg and "\n" not in msg


def test_a_flipped_byte_in_the_middle_of_a_big_file_needs_the_full_check(tmp_path) -> None:
    """The documented trade-off: every use checks sizes + first/middle/last MiB only."""
    path = tmp_path / "big.bin"
    verified_file(path, Builder(bytes(5 << 20)))
    with open(path, "r+b") as f:
        f.seek(1 << 20 | 12345)  # outside the three sampled MiB
        f.write(b"\1")
    assert verify(path, directory=False) is None
    assert "sha256 differs" in verify(path, directory=False, full=True)


def test_expected_sha256(tmp_path) -> None:
    import hashlib

    path, build = tmp_path / "model.gguf", Builder()
    good = hashlib.sha256(build.data).hexdigest()
    with pytest.raises(CacheError, match=r"has sha256 .* expected 0+"):
        verified_file(path, build, expected_sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.gguf.lock"]  # nothing kept
    verified_file(path, build, expected_sha256=good)
    assert verify(path, directory=False, expected_sha256=good) is None
    assert verify(path, directory=False, expected_sha256="1" * 64) is not None  # a new upstream file


def test_a_failing_build_propagates_and_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "x.bin"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise ValueError("source package missing")

    with pytest.raises(ValueError, match="source package missing"):
        verified_file(path, broken)
    with pytest.raises(ValueError, match="source package missing"):
        verified_dir(tmp_path / "d", lambda tmp: broken(tmp / "a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", ".x.bin.lock"]
    verified_file(path, Builder())  # and the next use builds it
    assert path.stat().st_size == 100


def _fill(tmp: Path) -> None:
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 20)
    (tmp / "config.json").write_text('{"a": 1}')


def test_a_damaged_dir_is_rebuilt_and_replaced_whole(tmp_path, caplog) -> None:
    path, calls = tmp_path / "model-abc", []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        _fill(tmp)

    verified_dir(path, build)
    assert oct(path.stat().st_mode & 0o777) == "0o755" and (path / cache.DIR_MANIFEST).is_file()
    (path / "stray.txt").write_text("a file the manifest does not list is ignored")
    verified_dir(path, build)
    assert len(calls) == 1
    (path / "config.json").write_text("garbage!")
    verified_dir(path, build)
    assert len(calls) == 2 and json.loads((path / "config.json").read_text()) == {"a": 1}
    assert not (path / "stray.txt").exists()  # the whole folder was replaced
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    (msg,) = _warnings(caplog)
    assert "config.json: content differs" in msg and str(path) in msg


def test_stale_temporaries_of_a_crashed_build_are_removed(tmp_path) -> None:
    (tmp_path / ".tmp-model-abc-123").mkdir()
    (tmp_path / ".tmp-model-abc-123" / "half.bin").write_bytes(b"h")
    (tmp_path / ".tmp-other-1").mkdir()  # another entry's: not ours to remove
    verified_dir(tmp_path / "model-abc", _fill)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == [".tmp-other-1"]


def test_load_verified_rebuilds_once_when_a_checked_entry_fails_to_load(tmp_path, caplog) -> None:
    path, builds, loads = tmp_path / "m", [], []

    def build(tmp: Path) -> None:
        builds.append(1)
        _fill(tmp)

    def flaky(p: Path) -> str:
        loads.append(1)
        if len(loads) == 2:  # the second load of a valid entry fails (e.g. a new library version)
            raise OSError("header too large")
        return (p / "config.json").read_text()

    assert load_verified(path, build, flaky) == '{"a": 1}' and builds == [1]
    assert load_verified(path, build, flaky) == '{"a": 1}' and builds == [1, 1] and len(loads) == 3
    (msg,) = _warnings(caplog)
    assert "fails to load: OSError: header too large" in msg and str(path) in msg

    def always_broken(p: Path) -> str:
        raise RuntimeError("bad loader")

    with pytest.raises(RuntimeError, match="bad loader"):  # no loop: one rebuild, then the error
        load_verified(path, build, always_broken)
    assert builds == [1, 1, 1]


def test_load_verified_uses_what_build_returns(tmp_path) -> None:
    def build(tmp: Path) -> str:
        _fill(tmp)
        return "built"

    assert load_verified(tmp_path / "m", build, lambda p: "loaded") == "built"
    assert load_verified(tmp_path / "m", build, lambda p: "loaded") == "loaded"


def test_an_entry_that_cannot_be_built_names_the_path(tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(CacheError, match=r"cannot create the cache entry .*not-a-folder/m.*HIERSPEC_CACHE"):
        verified_dir(blocker / "m", _fill)  # ENOTDIR even for root


def test_a_damaged_entry_that_cannot_be_rebuilt_says_what_to_delete(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m"
    verified_dir(path, _fill)
    (path / "config.json").unlink()

    def read_only(p: Path):
        raise PermissionError(errno.EROFS, "Read-only file system", str(p.parent / f".{p.name}.lock"))

    monkeypatch.setattr(cache, "_locked", read_only)
    with pytest.raises(CacheError) as info:
        verified_dir(path, _fill)
    msg = str(info.value)
    assert f"the cache entry {path} is damaged (config.json: missing)" in msg
    assert f"delete {path} or set HIERSPEC_CACHE" in msg and "Read-only file system" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_cache_folder(tmp_path) -> None:
    verified_file(tmp_path / "ok.bin", Builder())
    tmp_path.chmod(0o555)
    try:
        assert verified_file(tmp_path / "ok.bin", Builder()).is_file()  # a valid entry needs no lock
        with pytest.raises(CacheError, match="cannot create the cache entry"):
            verified_file(tmp_path / "new.bin", Builder())
    finally:
        tmp_path.chmod(0o755)


def test_concurrent_first_uses_build_once(tmp_path, caplog) -> None:
    path, build = tmp_path / "shared.bin", Builder(delay=0.2)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(verified_file(path, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1 and results == [path] * 4 and path.read_bytes() == build.data
    path.write_bytes(b"")  # and a damaged one is repaired once, with one warning
    threads = [threading.Thread(target=verified_file, args=(path, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 2 and len(_warnings(caplog)) == 1


def test_the_warning_is_one_line_on_stderr(tmp_path) -> None:
    path = tmp_path / "c.bin"
    code = (
        "import sys; from pathlib import Path; from hierspec.cache import verified_file\n"
        "verified_file(Path(sys.argv[1]), lambda t: t.write_bytes(b'abc'))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    path.write_bytes(b"a")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stderr.splitlines() == [
        f"hierspec: the cache entry {path} is damaged (c.bin: 1 bytes, expected 3); rebuilding it"
    ]
    assert path.read_bytes() == b"abc"


def test_json_cache(tmp_path, caplog) -> None:
    path = tmp_path / "curves" / "cpu.json"
    assert read_json_cache(path) is None and _warnings(caplog) == []  # absent: silent
    assert write_json_cache(path, {"version": 1, "costs": [1.0]})
    valid = lambda obj: obj.get("version") == 1  # noqa: E731
    assert read_json_cache(path, valid) == {"version": 1, "costs": [1.0]}
    for text in ['{"version": 1, "cos', '{"version": 2}', "[1, 2]"]:  # cut short, stale, foreign
        path.write_text(text)
        caplog.clear()
        assert read_json_cache(path, valid) is None
        (msg,) = _warnings(caplog)
        assert str(path) in msg and "\n" not in msg
    blocker = tmp_path / "file"
    blocker.write_text("")
    caplog.clear()
    assert write_json_cache(blocker / "x.json", {}) is False
    (msg,) = _warnings(caplog)
    assert "cannot write the cache file" in msg and "HIERSPEC_CACHE" in msg


def test_write_manifest_and_full_verify_of_a_dir(tmp_path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    _fill(d)
    manifest = write_manifest(d, directory=True)
    assert sorted(manifest["files"]) == ["config.json", "sub/weights.bin"]
    assert verify(d, directory=True, full=True) is None
    (d / "sub" / "weights.bin").unlink()
    assert verify(d, directory=True) == "sub/weights.bin: missing"


# ---------------------------------------------------------------------------- 2. SmolLM2 copy (fake GGUF)
def _char_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *map(chr, range(32, 92))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """smollm2 with a fake GGUF: `_load_gguf` builds a tiny Llama (counted in ``.calls``)."""
    from factories import tiny_hf
    from hierspec.models import smollm2

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[int] = []

    def load_gguf():
        calls.append(1)
        return tiny_hf(seed=0), _char_tokenizer()

    monkeypatch.setattr(smollm2, "smollm2_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "_load_gguf", load_gguf)
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path / "cache"))
    smollm2.calls = calls  # type: ignore[attr-defined]
    return smollm2


def _logits(model) -> torch.Tensor:
    model.reset()
    return model.forward(torch.tensor([[1, 5, 7, 9]])).logits


def _damage_truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])


def _damage_garbage_config(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def _damage_broken_but_listed(path: Path) -> None:
    """A copy that passes the manifest check but does not load (e.g. written by a buggy build)."""
    (path / "config.json").write_text('{"model_type": "no-such-model"}')
    write_manifest(path, directory=True)


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate,
        lambda p: (p / "model.safetensors").unlink(),
        _damage_garbage_config,
        lambda p: (p / cache.DIR_MANIFEST).unlink(),  # a copy made before this change
        _damage_broken_but_listed,
    ],
    ids=["truncated", "deleted", "garbage-config", "no-manifest", "loads-badly"],
)
def test_smollm2_copy_heals(fake_smollm2, caplog, damage) -> None:
    smollm2 = fake_smollm2
    model, tok = smollm2.load_smollm2()
    path = smollm2.smollm2_cache_path()
    ref = _logits(model)
    assert smollm2.calls == [1]
    model, tok = smollm2.load_smollm2()  # from the copy
    assert smollm2.calls == [1] and tok.chat_template and torch.equal(_logits(model), ref)
    assert _warnings(caplog) == []
    damage(path)
    model, tok = smollm2.load_smollm2()  # rebuilt, one warning, works
    assert smollm2.calls == [1, 1] and torch.equal(_logits(model), ref)
    (msg,) = _warnings(caplog)
    assert f"the cache entry {path} is damaged" in msg and msg.endswith("rebuilding it")
    model, tok = smollm2.load_smollm2()  # and it stays healed
    assert smollm2.calls == [1, 1] and torch.equal(_logits(model), ref) and len(_warnings(caplog)) == 1
    assert verify(path, directory=True, full=True) is None


def test_smollm2_unwritable_cache_loads_the_gguf_with_one_warning(
    fake_smollm2, tmp_path, monkeypatch, caplog
):
    smollm2 = fake_smollm2
    (tmp_path / "ro").write_text("")  # a file where the cache folder should be: mkdir fails, even as root
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path / "ro" / "cache"))
    model, _ = smollm2.load_smollm2()
    assert smollm2.calls == [1] and model.vocab_size == 64
    (msg,) = _warnings(caplog)
    assert "cannot create the cache entry" in msg and "loading the GGUF model directly" in msg


def test_smollm2_damaged_unrebuildable_copy_loads_the_gguf(fake_smollm2, monkeypatch, caplog) -> None:
    smollm2 = fake_smollm2
    smollm2.load_smollm2()
    path = smollm2.smollm2_cache_path()
    _damage_truncate(path)

    def read_only(p: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(p.parent))

    monkeypatch.setattr(cache, "_locked", read_only)
    model, _ = smollm2.load_smollm2()
    assert smollm2.calls == [1, 1] and model.vocab_size == 64
    (msg,) = _warnings(caplog)
    assert f"the cache entry {path} is damaged" in msg and f"delete {path}" in msg
    assert "loading the GGUF model directly" in msg


# ---------------------------------------------------------------------------- 3. the real SmolLM2 copy
@pytest.mark.smollm
def test_real_smollm2_truncated_copy_is_rebuilt(tmp_path, monkeypatch, caplog) -> None:
    """Two GGUF loads (~20 s each): the first use, then the rebuild of a truncated copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from hierspec.models import smollm2

    try:
        smollm2.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING)
    model, _ = smollm2.load_smollm2()
    ref = _logits(model)
    del model
    path = smollm2.smollm2_cache_path()
    assert verify(path, directory=True, full=True) is None
    _damage_truncate(path)
    model, tok = smollm2.load_smollm2()
    assert torch.equal(_logits(model), ref) and tok.chat_template
    (msg,) = _warnings(caplog)
    assert f"{path} is damaged (model.safetensors:" in msg
    assert verify(path, directory=True, full=True) is None
