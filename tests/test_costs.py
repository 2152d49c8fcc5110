"""Cost curves: interpolation, measurement, the host-keyed cache (other host / model re-measured,
damaged file warned about and re-measured), drift. No timing assertions."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import hierspec.costs as costs
from hierspec.costs import CostCurve, DriftTracker, cache_file, cost_curve, cost_key, measure_cost_curve
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
    assert cache_file(cost_key(model)).is_file()
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
    path = cache_file(cost_key(model))
    obj = json.loads(path.read_text())
    obj["key"]["host"]["cpu"] = "another CPU"  # a file copied from another machine
    obj["curve"]["seconds"] = [9.0] * len(obj["curve"]["seconds"])
    path.write_text(json.dumps(obj))
    c = cost_curve(model)
    assert len(counted) == 2 and c.seconds[0] == 1.0


@pytest.mark.parametrize("content", ["{not json", '{"key": 1}', "[]", ""])
def test_damaged_cache_file_warns_and_remeasures(model, counted, caplog, content):
    cost_curve(model)
    path = cache_file(cost_key(model))
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        c = cost_curve(model)
    assert len(counted) == 2 and c.sizes == costs.DEFAULT_SIZES
    assert json.loads(path.read_text())["curve"]["sizes"] == list(costs.DEFAULT_SIZES)  # rewritten


def test_damaged_curve_values_warn(model, counted, caplog):
    cost_curve(model)
    path = cache_file(cost_key(model))
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


def test_drift_tracker():
    d = DriftTracker(tol=0.25, min_obs=5, weight=0.5)
    assert all(d.observe(1.0, 1.1) is None for _ in range(20))  # within tolerance
    out = [d.observe(1.0, 2.0) for _ in range(10)]
    r = next(x for x in out if x is not None)
    assert r > 1.25
    assert d.observe(0.0, 1.0) is None
    with pytest.raises(ValueError, match="drift"):
        DriftTracker(tol=0)
