"""`Calibration.load` validates the file's shape and values and names the file and the field
(issue 19 item 3: a short alpha once treated a draft as the target, negative costs and alpha = 5
planned -1000 ms/token, "costs": "abc" crashed inside zip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hierspec.calibrate import Calibration, check_calibration
from hierspec.models import shipped


def _good() -> dict:
    return {
        "names": ["small", "mid", "target"],
        "fingerprints": ["a", "b", "c"],
        "sizes": [1, 2, 4],
        "costs": [[0.001, 0.0012, 0.0015], [0.004, 0.005, 0.006], [0.02, 0.021, 0.024]],
        "alpha": [[1.0, 0.8, 0.6], [0.8, 1.0, 0.9], [0.6, 0.9, 1.0]],
        "alpha_lo": [[1.0, 0.7, 0.5], [0.7, 1.0, 0.8], [0.5, 0.8, 1.0]],
        "alpha_hi": [[1.0, 0.9, 0.7], [0.9, 1.0, 0.95], [0.7, 0.95, 1.0]],
        "sampling": "T=1",
        "context": 256,
        "num_prompts": 8,
    }


def _load(tmp_path: Path, raw: object) -> Calibration:
    path = tmp_path / "x.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return Calibration.load(path)


def _with(**changes: object) -> dict:
    raw = _good()
    raw.update(changes)
    return raw


def test_a_good_file_loads_and_plans(tmp_path) -> None:
    cal = _load(tmp_path, _good())
    assert cal.names == ["small", "mid", "target"] and cal.cost(0, 3) == pytest.approx(0.00135)


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        # the defects of the issue
        (_with(alpha=[[1.0, 0.8], [0.8, 1.0]]), '"alpha"', "expected a 3x3 matrix (one row per model in "),
        (_with(costs=[[-1.0, 0.1, 0.2], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]), '"costs[0][0]"', "got -1.0"),
        (_with(alpha=[[1.0, 5, 0.6], [0.8, 1.0, 0.9], [0.6, 0.9, 1.0]]), '"alpha[0][1]"', "in [0, 1], got 5"),
        (_with(costs="abc"), '"costs"', 'expected 3 lists (one per model in "names"), got "abc"'),
        ("{not json", None, "is unreadable or malformed"),
        ({k: v for k, v in _good().items() if k != "sizes"}, '"sizes"', "is missing"),
        (_with(speedup=3.0), '"speedup"', "unknown field"),
        # and the rest of the shape
        ([1, 2], None, "expected a JSON object"),
        (_with(names=[]), '"names"', "non-empty list"),
        (_with(names=["a", 3, "c"]), '"names"', "non-empty list"),
        (_with(fingerprints=["a"]), '"fingerprints"', "3 strings"),
        (_with(sizes=[1, 4, 2]), '"sizes"', "strictly increasing"),
        (_with(sizes=[0, 1, 2]), '"sizes"', "positive integers"),
        (_with(sizes=[1, 2.5, 4]), '"sizes"', "positive integers"),
        (
            _with(costs=[[0.1, 0.2], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]),
            '"costs[0]"',
            '3 costs (one per entry of "sizes")',
        ),
        (_with(costs=[[0.1, 0.2, None]] * 3), '"costs[0][2]"', "positive finite"),
        (_with(costs=[[0.1, 0.2, 0.0]] * 3), '"costs[0][2]"', "positive finite"),
        ('{"costs": [[1e999]]}', None, "is missing"),  # a fragment: the first missing field is named
        (_with(alpha_lo=[[1.0, 0.8, 0.6], [0.8, 1.0], [0.6, 0.9, 1.0]]), '"alpha_lo"', "2 columns in row 1"),
        (_with(alpha_hi=[[1.0, 0.8, 0.6], [0.8, 1.0, 0.9], [0.6, 0.9, -0.1]]), '"alpha_hi[2][2]"', "[0, 1]"),
        (_with(alpha=[[1.0, True, 0.6], [0.8, 1.0, 0.9], [0.6, 0.9, 1.0]]), '"alpha[0][1]"', "got True"),
        (_with(sampling=1), '"sampling"', "a string"),
        (_with(context=0), '"context"', "positive integer"),
        (_with(num_prompts="8"), '"num_prompts"', "positive integer"),
    ],
)
def test_each_defect_is_one_error_naming_the_file_and_the_field(tmp_path, raw, field, message) -> None:
    with pytest.raises(ValueError) as info:
        _load(tmp_path, raw)
    msg = str(info.value)
    assert msg.startswith(f"calibration file {str(tmp_path / 'x.json')!r}") and "\n" not in msg
    assert message in msg
    if field is not None:
        assert f"field {field}" in msg


def test_the_issue_example_message(tmp_path) -> None:
    with pytest.raises(ValueError) as info:
        _load(tmp_path, _with(alpha=[[1.0, 0.8], [0.8, 1.0]]))
    assert str(info.value) == (
        f'calibration file {str(tmp_path / "x.json")!r}: field "alpha": expected a 3x3 matrix '
        '(one row per model in "names"), got 2 rows'
    )


def test_infinite_cost_and_rounding_above_one(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_good()).replace("0.0015", "Infinity"))
    with pytest.raises(ValueError, match=r'field "costs\[0\]\[2\]": expected a positive finite number'):
        Calibration.load(path)
    # a measured diagonal can exceed 1 by a rounding error: accepted
    check_calibration(_with(alpha=[[1.0000000000000002, 0.8, 0.6], [0.8, 1.0, 0.9], [0.6, 0.9, 1.0]]))
    # costs need not increase with the size (noisy medians)
    check_calibration(_with(costs=[[0.002, 0.0015, 0.003]] * 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_shipped_calibrations_load(dtype) -> None:
    cal = Calibration.load(shipped.calibration_path(dtype))
    assert len(cal.names) == len(cal.alpha) >= 2
