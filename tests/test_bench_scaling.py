"""bench/scaling.py at a tiny size: every op and baseline runs, on the CPU (and the GPU
when there is one), and the report is written."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scaling

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # gpu: skipped without CUDA


@pytest.mark.parametrize("device", DEVICES)
def test_sweep_rows_and_report(tmp_path, monkeypatch, device):
    monkeypatch.setattr(scaling, "DEVICE", torch.device(device))
    rows = scaling.measure(2, 500, min_time=0.0)
    assert [r["op"] for r in rows] == [
        "pool sum",
        "pool mean",
        "unpool",
        "spmm fwd",
        "spmm fwd+bwd",
    ]
    for r in rows:
        assert r["BT"] == 2 and r["N"] == 500 and r["rows"] == 1000
        for key in ("fastcore_s", "baseline_s", "copy_GBps", "pct_copy", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["op"], key, r[key])
        r["setting"] = "plain" if device == "cpu" else "cuda"
    info = {"date": "2026-01-01", "cpu": "test cpu", "gpu": None, "cores": 2, "torch": "x",
            "threads": 2, "command": "python bench/scaling.py"}  # fmt: skip
    scaling.write_report(rows, tmp_path / "out", info)
    table = (tmp_path / "out.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)  # the header, then one line per row
    assert json.loads((tmp_path / "out.json").read_text())["rows"][0]["op"] == "pool sum"
