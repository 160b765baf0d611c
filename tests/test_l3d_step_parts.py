"""benchmarks/l3d_step_parts.py: one row on the cached TMS 5-2 target (L3D's ``5-2`` variant),
its table, and its refusals."""

import pytest

from benchmarks import l3d_step_parts


def test_a_row_times_every_part_and_tabulates():
    row = l3d_step_parts.time_parts("l3d:5-2", 8, 1)
    assert set(row["ms"]) == set(l3d_step_parts.PARTS)
    assert all(ms > 0 for ms in row["ms"].values())
    assert row["n_params"] == 2 * 5 * 2 + 5 and row["C"] == 5  # linear1, linear2 (+ its bias)
    md = l3d_step_parts.to_markdown({"machine": {"device": "cpu", "cpu_count": 2, "date": "d",
                                                 "commit": "c"}, "calls": 1, "rows": [row],
                                     "command": "cmd"})
    assert "| `l3d:5-2` | 8 |" in md and md.count("\n|") == 3


def test_refusals():
    with pytest.raises(ValueError, match="--calls must be at least 1, got 0"):
        l3d_step_parts.main(["--calls=0"])
    with pytest.raises(ValueError, match="is a 'spd' config; expected an L3D one"):
        l3d_step_parts.time_parts("tms:5-2", 8, 1)
