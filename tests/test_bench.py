"""`python -m gpool.bench` on a tiny step count: its code path, not its timings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import GENERATED, gpool_env, run_python

pytestmark = pytest.mark.process


def test_bench_runs_both_loops_and_ends_with_the_ratio(idx_root: Path, tmp_path: Path) -> None:
    proc = run_python(
        [
            sys.executable,
            "-m",
            "gpool.bench",
            "--steps",
            "3",
            "--rounds",
            "2",
            "--tta-epochs",
            "1",
            "--target-acc",
            "0.0",
            "--device",
            "cpu",
            "--fused",
            "3",
            GENERATED,
            "mlflow.log_model=false",  # end to end: the run's own path, not torch.export
        ],
        tmp_path,
        gpool_env(idx_root),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and "torch " in lines[0] and "device cpu" in lines[0]
    assert sum(line.startswith("round ") for line in lines) == 8  # 4 sides, 2 rounds
    names = ["reference, published", "reference, tidied", "gpool", "gpool fused x3"]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(names) <= set(rows)
    for name in names:
        cells = [c.strip() for c in rows[name].strip("|").split("|")[1:]]
        seconds, rate, peak = (float(c.replace(",", "")) for c in cells[:3])
        assert seconds > 0 and rate > 0 and peak >= 0 and cells[3].endswith("x")
    assert rows["gpool"].endswith("| 1.00x |")
    assert any(line.startswith("fused x3: ") and "the throughput" in line for line in lines)
    assert any("time to GAP val acc >= 0.0 (experiment=quick): epoch 1" in line for line in lines)
    assert any(line.startswith("end to end:") and "MLflow calls" in line for line in lines)
    assert lines[-1].startswith("speed-up reference (as published)/gpool per epoch: ")
    assert float(lines[-1].split(": ")[1].rstrip("x")) > 0


def test_bench_times_compare_over_a_server_against_sqlite(tmp_path: Path) -> None:
    """`--compare RUNS`: simulated runs logged to a sqlite store and through a real `mlflow
    server` (artifacts served), gpool.compare of each timed; the bench itself fails unless
    both comparisons read every run's predictions back (intervals over seeds and images)."""
    proc = run_python(
        [sys.executable, "-m", "gpool.bench", "--compare", "14", "--rounds", "1"],
        tmp_path,
        dict(os.environ),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and "--compare 14" in lines[1]
    assert [line.split(":")[0] for line in lines if " s of " in line] == ["sqlite", "server"]
    assert lines[-1].startswith("gpool.compare of 14 runs, mlflow ")
    assert float(lines[-1].split("server / sqlite ")[1].rstrip("x")) > 0
