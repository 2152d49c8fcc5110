"""Reliability of the command line: Ctrl-C (SIGINT) gives one line and exit status 130, and
``bench`` keeps what it finished (marked as interrupted); a prompt near the context limit is
warned about and its warm-up does not repeat the long prefill. The SIGINT tests run the embedded
SmolLM2 GGUF on llama.cpp in a subprocess (it loads in about a second)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.smollm

HIERSPEC = [sys.executable, "-c", "import sys; from hierspec.cli import main; sys.exit(main(sys.argv[1:]))"]


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HIERSPEC_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*HIERSPEC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_sigint_during_bench_keeps_finished_runs(tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--out", str(out), "--sets", "code", "--n", "4", "--methods", "ar,ngram"]
    args += ["--temperatures", "0", "--gammas", "3", "--max-new-tokens", "48", "--warmup", "0"]
    args += ["--backend", "llama.cpp"]
    proc = _start(args, tmp_path)
    seen = ""
    t0 = time.time()
    while "| 2/8" not in seen:  # the progress bar: two runs finished
        ch = proc.stderr.read(1)
        assert ch and time.time() - t0 < 240, seen
        seen += ch
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("hierspec: interrupted: kept the"), stderr
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] is True and len(res["rows"]) >= 2
    assert "**Interrupted**" in (out / "report.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_sigint_during_generate_is_one_line(tmp_path):
    args = ["generate", "--prompt", "Count from one to one thousand in words.", "--chat"]
    args += ["--method", "ar", "--max-new-tokens", "2000", "--backend", "llama.cpp"]
    proc = _start(args, tmp_path)
    assert proc.stdout.read(1) != ""  # the text has started streaming
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130
    assert [x for x in stderr.splitlines() if x.strip()] == ["hierspec: interrupted"], stderr


def test_near_context_prompt_warns_and_warms_up_on_a_short_prefix(monkeypatch, capsys):
    """A prompt that leaves room for fewer tokens than requested: one warning naming both
    numbers; the warm-up never prefills the whole long prompt again."""
    from hierspec.cli import main
    from hierspec.models import make_tiny_pair
    from hierspec.models.open import Opened

    target, _ = make_tiny_pair(vocab_size=64, seed=1, dtype=torch.float32, max_length=48)

    class Tok:
        eos_token_id = 2

        def __call__(self, text):
            return {"input_ids": [3 + ord(c) % 61 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    monkeypatch.setattr(
        "hierspec.models.open.open_target", lambda *a, **k: Opened(target, Tok(), "tiny", "torch")
    )
    prefills: list[int] = []
    forward = target.forward

    def spy(ids, **kw):
        if target.cache_length == 0:
            prefills.append(ids.shape[1])
        return forward(ids, **kw)

    monkeypatch.setattr(target, "forward", spy)
    prompt = "x" * 40  # 40 tokens in a 48-token context
    assert main(["generate", "--prompt", prompt, "--method", "ar", "--max-new-tokens", "32", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "leaves room for 8 of the 32 requested new tokens after the 40-token prompt" in err
    assert json.loads(out)["finish_reason"] == "length"
    assert sorted(prefills) == [15, 39]  # the warm-up's 16-token prefix, then the real prefill once
