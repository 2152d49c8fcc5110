"""Cost curves: interpolation, measurement (interleaved, spread- and shape-checked, noisy sizes
re-measured, untrusted curves never cached), the host-keyed cache (other host / model / version
re-measured, damaged or implausible file warned about and re-measured). No timing assertions:
the noisy-host tests run a fake model on a fake clock."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

import hierspec.costs as costs
from hierspec.costs import CostCurve, cost_curve, cost_key, curve_file, measure_cost_curve, spread, summarise
from hierspec.models import make_tiny_pair


def test_interpolation_and_extrapolation():
    c = CostCurve((1, 2, 4), (1.0, 2.0, 3.0))
    assert c(1) == 1.0 and c(3) == pytest.approx(2.5) and c(6) == pytest.approx(4.0)
    assert c(0) == 1.0 and c.decode == 1.0 and c.relative(4) == pytest.approx(3.0)
    assert c.scaled(2.0)(3) == pytest.approx(5.0)
    assert CostCurve.from_dict(c.to_dict()) == c
    assert CostCurve((1,), (0.5,))(4) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "sizes,secs",
    [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 1.0)), ((0, 1), (1.0, 1.0)), ((1, 2), (1.0, -1.0))],
)
def test_bad_curves(sizes, secs):
    with pytest.raises(ValueError, match="cost curve"):
        CostCurve(sizes, secs)


@pytest.fixture()
def model():
    return make_tiny_pair(vocab_size=16, seed=0, dtype=torch.float32)[0]


def test_measure_cost_curve(model):
    c = measure_cost_curve(model, sizes=(1, 2, 4), budget_s=0.05, context=16)
    assert c.sizes == (1, 2, 4) and all(s > 0 for s in c.seconds)
    assert model.cache_length == 0
    with pytest.raises(ValueError, match="budget_s"):
        measure_cost_curve(model, budget_s=0)


@pytest.fixture()
def counted(monkeypatch, tmp_path):
    """Cache under tmp_path; `measure_cost_curve` replaced by a counter returning a fixed curve."""
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path))
    calls = []

    def fake(model, sizes, budget_s):
        calls.append(tuple(sizes))
        return CostCurve(tuple(sizes), tuple(float(n) for n in sizes))

    monkeypatch.setattr(costs, "measure_cost_curve", fake)
    return calls


def test_cache_hit_and_refresh(model, counted):
    a = cost_curve(model)
    b = cost_curve(model)
    assert a == b and len(counted) == 1
    assert curve_file(model).is_file()
    cost_curve(model, refresh=True)
    cost_curve(model, cache=False)
    assert len(counted) == 3


def test_other_host_or_model_is_remeasured(model, counted, monkeypatch):
    cost_curve(model)
    other_model = make_tiny_pair(vocab_size=16, seed=1, dtype=torch.float32)[0]
    cost_curve(other_model)
    assert len(counted) == 2
    host = costs.host_key()
    monkeypatch.setattr(costs, "host_key", lambda: {**host, "flags": ["avx2"], "cpu": "another CPU"})
    cost_curve(model)
    assert len(counted) == 3


def test_copied_cache_file_with_another_key_is_not_trusted(model, counted):
    cost_curve(model)
    path = curve_file(model)
    obj = json.loads(path.read_text())
    obj["key"]["host"]["cpu"] = "another CPU"  # a file copied from another machine
    obj["curve"]["seconds"] = [9.0] * len(obj["curve"]["seconds"])
    path.write_text(json.dumps(obj))
    c = cost_curve(model)
    assert len(counted) == 2 and c.seconds[0] == 1.0


@pytest.mark.parametrize("content", ["{not json", '{"key": 1}', "[]", ""])
def test_damaged_cache_file_warns_and_remeasures(model, counted, caplog, content):
    cost_curve(model)
    path = curve_file(model)
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        c = cost_curve(model)
    assert len(counted) == 2 and c.sizes == costs.DEFAULT_SIZES
    assert json.loads(path.read_text())["curve"]["sizes"] == list(costs.DEFAULT_SIZES)  # rewritten


def test_damaged_curve_values_warn(model, counted, caplog):
    cost_curve(model)
    path = curve_file(model)
    obj = json.loads(path.read_text())
    obj["curve"]["seconds"][0] = -1.0
    path.write_text(json.dumps(obj))
    with caplog.at_level(logging.WARNING):
        cost_curve(model)
    assert len(counted) == 2
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_file_backed_model_identity(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)

    class FileModel:
        model_path = str(f)
        vocab_size, max_length = 8, 32

    ident = costs.model_identity(FileModel())
    assert ident.startswith("file:") and ident.endswith(f":10:{f.stat().st_mtime_ns}")


def test_key_names_what_changes_costs(model):
    key = cost_key(model)
    assert {"host", "backend", "dtype", "device", "model", "threads", "versions"} <= set(key)
    assert {"cpu", "flags", "cores"} <= set(key["host"])
    assert key["backend"].endswith("TinyGPT") and key["model"].startswith("params:")


# ------------------------------------------------------------------- a noisy host
MS = 1e-3
TRUE_MS = {1: 12, 2: 22, 3: 34, 4: 37, 6: 53, 8: 69}  # llama.cpp SmolLM2 on this host (issue #27)


class FakeTimedModel:
    """A model whose forward of n tokens advances a fake clock by TRUE_MS[n] times the host's
    load factor at that moment (``load(t)``); records the sizes in call order."""

    vocab_size, max_length = 16, 512

    def __init__(self, load):
        self.t, self.load, self.calls = 0.0, load, []

    def clock(self):
        return self.t

    def reset(self):
        pass

    def crop(self, n):
        pass

    def forward(self, ids):
        n = ids.shape[1]
        if n in TRUE_MS:
            self.calls.append(n)
            self.t += TRUE_MS[n] * MS * self.load(self.t)


def burst(start, end, factor=20.0):
    return lambda t: factor if start <= t < end else 1.0


def test_measurement_is_interleaved():
    m = FakeTimedModel(lambda t: 1.0)
    measure_cost_curve(m, sizes=(1, 2, 4), budget_s=0.01, clock=m.clock)
    timed = m.calls[3:]  # after the warm-up round
    for r in range(0, len(timed) - 3, 3):
        assert sorted(timed[r : r + 3]) == [1, 2, 4]  # every round times every size once
    assert timed[:3] != timed[3:6]  # in a rotated order


def test_quiet_host_curve_is_trusted_and_exact():
    m = FakeTimedModel(lambda t: 1.0)
    c = measure_cost_curve(m, clock=m.clock)
    assert c.trusted and c.seconds == pytest.approx([TRUE_MS[n] * MS for n in c.sizes])


def test_burst_is_remeasured_and_the_curve_heals():
    """A load burst (20x) from the second size's repeats on: measured size after size (the old
    way) it poisons the shape of the curve with tight repeats (issue #27); interleaved, it makes
    repeats disagree or the shape implausible, the failing sizes are measured again after it,
    and the curve comes out right and trusted."""
    m = FakeTimedModel(burst(0.35, 1.5))
    c = measure_cost_curve(m, clock=m.clock)
    assert c.trusted
    assert c.seconds == pytest.approx([TRUE_MS[n] * MS for n in c.sizes], rel=0.05)


def test_noisy_measurement_is_not_persisted(monkeypatch, tmp_path, caplog):
    """A host loaded on and off throughout (every other 50 ms at 20x): the curve is used, marked
    untrusted, said once, and never written to the cache, so the next run measures again."""
    monkeypatch.setenv("HIERSPEC_CACHE", str(tmp_path))
    m = FakeTimedModel(lambda t: 20.0 if int(t / 0.05) % 2 else 1.0)
    monkeypatch.setattr(time, "perf_counter", m.clock)  # the default clock of the measurement
    monkeypatch.setattr(costs, "cost_key", lambda model: {"version": costs.CACHE_VERSION, "model": "fake"})
    with caplog.at_level(logging.WARNING):
        c = cost_curve(m)
    assert not c.trusted
    assert not curve_file(m).exists()
    assert sum("busy host" in r.getMessage() for r in caplog.records) == 1
    calls = len(m.calls)
    cost_curve(m)
    assert len(m.calls) > calls  # measured again


def test_spread_and_summary():
    assert spread([1.0, 1.0, 1.0]) == 0.0 and spread([1.0, 2.0]) == float("inf")
    assert spread([1.0, 1.1, 1.0, 3.0, 1.05]) > 0.05
    sizes = (1, 2, 4)
    good, bad = summarise(sizes, [[1.0] * 5, [1.8] * 5, [3.0] * 5])
    assert good.trusted and bad == [] and good.seconds == (1.0, 1.8, 3.0)
    poisoned, bad = summarise(sizes, [[1.0] * 5, [1.0] * 5, [30.0] * 5])  # tight but implausible
    assert not poisoned.trusted and bad == [2]
    _, bad = summarise(sizes, [[1.0, 1.0, 5.0, 9.0, 1.0], [1.8] * 5, [3.0] * 5])
    assert bad == [0]


def test_implausible_cached_curve_is_remeasured(model, counted, caplog):
    cost_curve(model)
    path = curve_file(model)
    obj = json.loads(path.read_text())
    obj["curve"]["seconds"] = [0.027, 0.092, 0.092, 0.745, 1.216, 1.216]  # issue #27's curve
    path.write_text(json.dumps(obj))
    with caplog.at_level(logging.WARNING):
        c = cost_curve(model)
    assert len(counted) == 2 and c.seconds[0] == 1.0


def test_older_cache_version_is_remeasured(model, counted, monkeypatch):
    """A file written before the spread check (an older CACHE_VERSION) is not used."""
    with monkeypatch.context() as m:
        m.setattr(costs, "CACHE_VERSION", costs.CACHE_VERSION - 1)
        cost_curve(model)
        cost_curve(model)
    assert len(counted) == 1
    cost_curve(model)
    assert len(counted) == 2


def test_each_set_of_sizes_has_its_own_file(model, counted, caplog):
    """A server's curve (more sizes) and generate's share a model but not a cache file: neither
    overwrites the other, and no warning calls either one damaged."""
    with caplog.at_level(logging.WARNING):
        cost_curve(model)
        cost_curve(model, sizes=(1, 2, 4))
        cost_curve(model)
        cost_curve(model, sizes=(1, 2, 4))
    assert len(counted) == 2 and curve_file(model) != curve_file(model, (1, 2, 4))
    assert not caplog.records
