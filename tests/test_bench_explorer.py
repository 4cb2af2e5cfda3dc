"""The explorer's benchmark runs end to end on a small record, so it cannot rot (it measures nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_the_explorer_bench_fills_a_record_and_times_every_page(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "explorer", "--output", str(output)],
        cwd=ROOT, env={**os.environ, "BENCH_EXPLORER_EVENTS": "3000"}, capture_output=True, text=True, timeout=170,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(output.read_text())}
    for page in ("overview (last 3 h)", "events: newest", "events: half-way down (keyset)",
                 "events: pattern cosmic.# (1%)", "events: has failed deliveries", "event: chain with a dead step",
                 "user: chains", "problems"):  # fmt: skip
        r = results[f"explorer {page}"]
        assert r["units"] == "ms" and r["ours"] > 0 and r["baseline"] > 0 and r["met"] is not None
        assert "3,000 events, 9,000 deliveries" in r["note"]
