"""The benchmarks run (a quick pass each), so a broken import or API drift cannot hide there;
and the shared harness's statistics, options and JSON do what the scripts rely on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


@pytest.mark.redis
@pytest.mark.slow
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
def test_benchmark_runs(command: list[str], tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, *command, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith("tiercache "), proc.stdout[:500]  # the harness's environment header
    doc = json.loads(out.read_text())
    assert doc["meta"]["redis_py"] and doc["meta"]["quick"] is True
    assert "wall_s" in doc["meta"]


def test_percentile_and_median() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.percentile(values, 50) == 3.0
    assert harness.percentile(values, 0) == 1.0
    assert harness.percentile(values, 99) == 5.0
    assert harness.median(values) == 3.0
    assert math.isnan(harness.percentile([], 50))
    assert math.isnan(harness.median([]))


def test_ratios_are_per_round_against_a_baseline_of_the_same_run() -> None:
    base = harness.Case("base", "s", "g", "base", None, baseline="base", samples=[100.0, 200.0, 100.0])
    case = harness.Case("case", "s", "g", "case", None, baseline="base", samples=[110.0, 200.0, 150.0])
    other = harness.Case("other", "s", "g", "other", None, samples=[50.0, 50.0, 50.0])
    by_key = {c.key: c for c in (base, case, other)}
    r = harness.ratios(case, by_key)
    assert r.rounds == [1.1, 1.0, 1.5]
    assert r.median == 1.1
    assert str(r) == "1.10x  [1.00-1.50]"
    assert harness.ratios(case, by_key, against="other").rounds == [2.2, 4.0, 3.0]
    assert not harness.ratios(other, by_key)  # no baseline: no ratio


def test_measure_interleaves_the_cases_and_keeps_the_fastest_batch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.gc, "collect", lambda: 0)  # the runners are fakes: nothing to tidy up
    order: list[str] = []

    def runner(name: str) -> harness.Runner:
        def run(n: int) -> int:
            order.append(name)
            return 1000 * n

        return run

    cases = [harness.Case(k, "s", "g", k, runner(k)) for k in "abc"]
    cases.append(harness.skipped("d", "s", "g", "d", "not installed"))
    harness.measure(cases, repeats=2, sample_ms=2, parts=2, start_n=10)
    rounds = order[-12:]  # after the calibration: 2 rounds of 2 batches per case, forward then backward
    assert "".join(rounds) == "abccbaabccba"
    assert [c.n for c in cases] == [1000, 1000, 1000, 0]  # calibrated: 1 ms a batch, of 2 ms over 2 parts
    assert [c.samples for c in cases] == [[1000.0, 1000.0]] * 3 + [[]]
    assert "round 2/2 done" in capsys.readouterr().err


def test_interleaved_reverses_every_other_round() -> None:
    assert [list(harness.interleaved([1, 2, 3], r)) for r in range(3)] == [[1, 2, 3], [3, 2, 1], [1, 2, 3]]


def test_free_port_is_below_the_limit_and_never_6379() -> None:
    for _ in range(20):
        port = harness.free_port()
        assert 0 < port < harness.PORT_LIMIT
        assert port != 6379


def test_common_options(tmp_path: Path) -> None:
    parser = harness.parser("doc", quick="smoke", repeats="rounds")
    args = harness.parse(parser, ["--quick", "--repeats", "4", "--json", "x.json", "--redis-server", "/bin/true"])
    assert (args.quick, args.repeats, args.json, args.redis_server) == (True, 4, "x.json", "/bin/true")
    assert not hasattr(harness.parse(harness.parser(None, quick="smoke"), ["--redis-server", "r"]), "repeats")
    with pytest.raises(SystemExit):
        harness.parse(harness.parser(None, quick="smoke"), ["--redis-server", ""])


def test_write_json_and_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = harness.verdict("x <= 1.2x", False, "1.30x", 1.3, width=10, limit=1.2)
    assert v == {"target": "x <= 1.2x", "met": False, "value": 1.3, "limit": 1.2}
    doc: dict[str, Any] = {"µ": [1, 2], "path": tmp_path}
    harness.write_json(tmp_path / "out.json", doc)
    out = capsys.readouterr().out
    assert "[MISSED] x <= 1.2x  1.30x" in out and "wrote" in out
    assert json.loads((tmp_path / "out.json").read_text()) == {"µ": [1, 2], "path": str(tmp_path)}
