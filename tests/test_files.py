"""`hierspec.files`: atomic writes leave the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import stat

import pytest

from hierspec.files import write_atomic, write_bytes_atomic, write_json_atomic


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
