"""The benchmark harness runs end to end with tiny counts, so it cannot rot (it measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_harness_runs_and_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(output.read_text())
    names = {r["name"] for r in results}
    for expected in ("publish (publish_sync)", "publish (publish_sync): storing alone, envelopes built beforehand",
                     "publish (publish_sync): building the envelope, in the publish loop vs back to back",
                     "publish (await publish)", "dispatch vs apply_async",
                     "dispatch vs celery-pubsub", "matching: 10,000 vs 10 subscriptions", "latency p50",
                     "latency p99", "latency p99, worst window", "latency stage p50: publish → XADD",
                     "latency stage p99: XADD → router read", "latency stage p50: LPUSH → worker receive",
                     "latency stage p99: task_prerun → handler start", "throughput end to end",
                     "throughput end to end vs stock Celery", "throughput CPU per event: total",
                     "throughput CPU per event: worker pool processes",
                     "Redis commands per handler run", "Redis commands per handler run, burst", "log writer",
                     "observability: publish (publish_sync), on vs off",
                     "observability: publish (publish_sync), on with 10% of traces sampled vs off",
                     "observability: throughput end to end, on vs off", "rabbitmq: dispatch vs apply_async",
                     "rabbitmq: latency p50", "rabbitmq: latency p99", "cluster: dispatch, 3 masters vs one Redis",
                     "cluster: dispatch, 2 routers vs 1 (3 masters)",
                     "cluster: dispatch, 3 masters vs 1 master (2 routers)",
                     "cluster: Redis commands per event, 3 masters (sum) vs one Redis",
                     "cluster: Redis commands per event, master 1 of 3"):  # fmt: skip
        assert expected in names
    for r in results:
        assert set(r) >= {"name", "ours", "baseline", "ratio", "target", "units", "machine"}
        if r["name"].startswith("memory:"):  # RSS growth: over a quick run's few events it may shrink
            assert isinstance(r["ours"], int | float), r
        elif r["name"].startswith("latency stage"):  # may be 0: shorter than its estimate's error
            assert r["ours"] >= 0, r
        elif r["name"].startswith("throughput CPU per event"):  # a quick run's few events: under a tick
            assert r["ours"] >= 0 and r["baseline"] >= 0, r
        else:
            assert r["ours"] > 0, r
        assert r["machine"]["cores"]
    assert "benchmark" in out.stdout and "ratio" in out.stdout
