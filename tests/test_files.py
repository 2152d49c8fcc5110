"""`hierspec.files`: atomic writes leave the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import stat

import pytest

from hierspec.files import (
    check_writable_dir,
    check_writable_file,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
)


def test_write_replace_and_mode(tmp_path) -> None:
    p = tmp_path / "sub" / "a.json"
    write_json_atomic(p, {"x": [1, 2]}, indent=1)
    assert json.loads(p.read_text()) == {"x": [1, 2]}
    write_bytes_atomic(p, b"new")
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [q.name for q in p.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    p = tmp_path / "ckpt.bin"
    write_bytes_atomic(p, b"old")

    def half_then_fail(tmp) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, half_then_fail)
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.bin"]
    with pytest.raises(TypeError):  # not JSON-serialisable: nothing is written at all
        write_json_atomic(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists()


def test_check_writable_file(tmp_path) -> None:
    check_writable_file(tmp_path / "cal.json", "--out")  # a new file in an existing folder
    assert list(tmp_path.iterdir()) == []  # creates nothing
    (tmp_path / "old.json").write_text("{}")
    check_writable_file(tmp_path / "old.json", "--out")  # replacing a file
    t = tmp_path
    cases = [
        ("/proc/x/cal.json", "--out: cannot write /proc/x/cal.json: the folder /proc/x does not exist"),
        (t, f"--out: cannot write {t}: it is a folder"),
        (t / "old.json" / "x", f"--out: cannot write {t}/old.json/x: {t}/old.json is not a folder"),
        ("/proc/cal.json", "--out: cannot write /proc/cal.json: the folder /proc is not writable"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            check_writable_file(path, "--out")
        assert str(info.value).startswith(message)


def test_check_writable_dir(tmp_path) -> None:
    check_writable_dir(tmp_path, "--out")  # an existing folder
    check_writable_dir(tmp_path / "a" / "b", "--out")  # to be created
    assert list(tmp_path.iterdir()) == []  # creates nothing
    (tmp_path / "f").write_text("")
    t = tmp_path
    cases = [
        (t / "f", f"--out: cannot write to {t}/f: it exists and is not a folder"),
        (t / "f" / "sub", f"--out: cannot write to {t}/f/sub: cannot create it: {t}/f is not a folder"),
        ("/proc/x/run", "--out: cannot write to /proc/x/run: cannot create it: the folder /proc is not"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            check_writable_dir(path, "--out")
        assert str(info.value).startswith(message)
