"""`python -m gpool.bench` on a tiny step count: its code path, not its timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import GENERATED, gpool_env


def test_bench_runs_both_loops_and_ends_with_the_ratio(idx_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
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
            GENERATED,
        ],
        cwd=tmp_path,
        env=gpool_env(idx_root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and "torch " in lines[0] and "device cpu" in lines[0]
    assert sum(line.startswith("round ") for line in lines) == 4  # A, B, A, B
    rows = [line for line in lines if line.startswith(("| reference |", "| gpool |"))]
    assert len(rows) == 2
    for row in rows:
        seconds, rate, peak = (float(c.replace(",", "")) for c in row.strip("|").split("|")[1:])
        assert seconds > 0 and rate > 0 and peak >= 0
    assert any("time to GAP val acc >= 0.0 (experiment=quick): epoch 1" in line for line in lines)
    assert any(line.startswith("end to end:") and "MLflow calls" in line for line in lines)
    assert lines[-1].startswith("speed-up reference/gpool per epoch: ")
    assert float(lines[-1].split(": ")[1].rstrip("x")) > 0
