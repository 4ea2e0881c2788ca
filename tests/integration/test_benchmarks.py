"""The benchmarks run (a quick pass each), so a broken import or API drift cannot hide there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.parametrize(
    "command",
    [
        ["benchmarks/bench_core.py", "--quick", "--only", "l1,l2,miss"],
        ["benchmarks/bench_coherence.py", "--quick"],
        ["benchmarks/bench_stampede.py", "--quick"],
        ["benchmarks/bench_coalesce.py", "--quick"],
        ["benchmarks/bench_embeddings.py", "--quick"],
        ["benchmarks/bench_outage.py", "--quick"],
    ],
    ids=["bench_core", "bench_coherence", "bench_stampede", "bench_coalesce", "bench_embeddings", "bench_outage"],
)
def test_benchmark_runs(command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "tiercache" in proc.stdout or "propagation latency" in proc.stdout
