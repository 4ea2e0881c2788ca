"""The benchmarks' shared harness: what every script in ``benchmarks/`` needs besides its own cases.

- ``RedisServer``: a throwaway redis-server on a free loopback port below 55,000 (never 6379), no
  persistence, in a temporary directory, stopped by its pid; on Linux it gets SIGTERM if the
  benchmark dies, even by SIGKILL (``PR_SET_PDEATHSIG``). ``redis_server()`` starts one for a
  ``with`` block, with ``exit_on_signals()`` so SIGTERM/SIGHUP also reach the ``finally``.
- ``environment()`` / ``header()`` / ``footer()``: what the figures depend on (Python,
  redis-server, redis-py, hiredis, tiercache version and git revision, the peers' versions, the
  load average), printed above the tables, with a warning when the machine is busy.
- ``Case`` / ``measure()``: interleaved rounds (every case's batches in turn, forward then
  backward, the garbage collector off; a round's sample is a case's fastest batch), and the
  statistics: ``median``, ``percentile``, ``ratios`` / ``Ratio`` against a baseline of the same run.
- ``verdict()``: one ``[MET   ]`` / ``[MISSED]`` line of a target check.
- ``parser()`` / ``parse()``: the common options (``--quick``, ``--json``, ``--repeats``,
  ``--redis-server``); ``write_json()``; ``main()``: the exit code, and 130 on Ctrl-C.

Importing this module puts the working tree first on ``sys.path``, so the scripts measure this
tree's tiercache, installed or not. See benchmarks/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # measure the working tree's tiercache, installed or not

import redis  # noqa: E402

T = TypeVar("T")
PEERS = ("cachetools", "async-lru", "aiocache", "cashews", "dogpile.cache")
PORT_LIMIT = 55_000  # redis-server derives its cluster bus port as port + 10,000: keep both valid


# -- signals -----------------------------------------------------------------------------------


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit, so the benchmark's ``finally`` stops its server."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_signal)


def die_with_parent() -> None:
    """In a child (before exec, or first thing in a worker process): get SIGTERM when the
    benchmark dies, even by SIGKILL. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(run: Callable[[], int | None]) -> None:
    """Run a script's ``main`` and exit with its code; Ctrl-C exits 130 (its server was
    stopped on the way out, by the ``finally`` of ``redis_server()``)."""
    try:
        sys.exit(run() or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


# -- the throwaway redis-server ------------------------------------------------------------------


def free_port(limit: int = PORT_LIMIT) -> int:
    """A free loopback port below ``limit``, never 6379."""
    rng = random.Random()
    for attempt in range(500):
        candidate = 0 if attempt < 20 else rng.randrange(20_000, limit)  # the kernel's pick first
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port < limit and port != 6379:
            return port
    raise RuntimeError(f"no free loopback port below {limit}")


class RedisServer:
    """A redis-server owned by this process: a free loopback port, no persistence, stopped by pid.

    ``start()`` may be called again after ``stop()`` (a new server on a new port, same directory);
    ``cleanup()`` stops it and removes the directory, and is idempotent."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="tiercache-bench-")
        self.version = "?"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> None:
        log_path = os.path.join(self.dir, "redis.log")
        for _ in range(5):
            self.port = free_port()
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
                     "--protected-mode", "no"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop the server ourselves
                    preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet
                )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    client = self.client(socket_timeout=0.5)
                    if client.ping():
                        self.version = str(client.info("server").get("redis_version", "?"))
                        client.close()
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    time.sleep(0.02)
            self.stop()  # port taken between probe and bind, or too slow: try another port
        with open(log_path, errors="replace") as log:
            raise RuntimeError(f"redis-server did not start: {log.read()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM to this pid only; --save "" so nothing is written
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_server(binary: str) -> Iterator[RedisServer]:
    """A started ``RedisServer`` for the block, stopped at its end (also on Ctrl-C, SIGTERM,
    SIGHUP or an exception; ``atexit`` as a second line of defence)."""
    exit_on_signals()
    server = RedisServer(binary)
    atexit.register(server.cleanup)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Commands the server ran so far, by name (``INFO commandstats``; Lua ``redis.call``s included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


# -- the environment header ------------------------------------------------------------------------


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(server: RedisServer | None, peers: Sequence[str] = PEERS) -> dict[str, Any]:
    """What the figures depend on, for the header and the JSON's ``meta``."""
    from importlib.metadata import PackageNotFoundError, version

    import tiercache

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    try:
        import hiredis

        hiredis_ver = getattr(hiredis, "__version__", "present")
    except ImportError:
        hiredis_ver = "absent"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
        "redis_server": f"{server.version} ({server.binary}, 127.0.0.1:{server.port})" if server else "not started",
        "redis_py": redis.__version__,
        "hiredis": f"{hiredis_ver}, used by redis-py: {getattr(redis.utils, 'HIREDIS_AVAILABLE', '?')}",
        "tiercache": f"{tiercache.__version__} ({ROOT}{', git ' + rev if rev else ''})",
        "peers": {d: ver(d) for d in peers},
    }


def header(title: str, meta: dict[str, Any], **lines: str) -> None:
    """The title, the environment, the script's own lines (``method=...``), and a warning when
    the load average is above half the CPU count."""
    print(title)
    for k, v in [*meta.items(), *lines.items()]:
        print(f"  {k + ':':<14} {v}")
    load1 = meta["loadavg"][0] if meta.get("loadavg") else 0.0
    if load1 > (os.cpu_count() or 1) / 2:
        print(f"  WARNING: load average {load1:.1f} on {os.cpu_count()} CPUs: other work is running, expect noise")


def footer(meta: dict[str, Any], started: float) -> dict[str, Any]:
    """The closing line (wall time, load average at start and end); returns them for the JSON."""
    elapsed = time.monotonic() - started
    load = loadavg()
    print(f"\nwall time {elapsed:.0f} s; load average at start {meta['loadavg']}, at end {load}")
    return {"wall_s": elapsed, "loadavg_end": load}


def progress(what: str) -> None:
    print(what, file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (``p`` in 0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Ratio:
    """Per-round ratios of a case to its baseline, both sampled in the same rounds."""

    rounds: list[float]

    @property
    def median(self) -> float:
        return median(self.rounds)

    def __bool__(self) -> bool:
        return bool(self.rounds)

    def __str__(self) -> str:
        return f"{self.median:.2f}x  [{min(self.rounds):.2f}-{max(self.rounds):.2f}]"


def ratio(samples: Sequence[float], baseline: Sequence[float]) -> Ratio:
    """Round by round ``samples / baseline`` (empty if either was not measured)."""
    if not samples or not baseline:
        return Ratio([])
    return Ratio([a / b for a, b in zip(samples, baseline, strict=True)])


def interleaved(items: Sequence[T], round_no: int) -> Sequence[T]:
    """``items`` in even rounds, reversed in odd ones: neighbours stay neighbours and no item is
    always first."""
    return items if round_no % 2 == 0 else items[::-1]


# -- interleaved rounds ----------------------------------------------------------------------------

Runner = Callable[[int], int]  # runs n calls, returns the elapsed ns


@dataclass
class Case:
    """One timed row: ``run(n)`` makes ``n`` calls and returns the elapsed ns."""

    key: str  # stable id, used by --json and as a baseline reference
    section: str
    group: str  # the heading the row is printed under
    label: str
    run: Runner | None
    baseline: str | None = None  # ratios are taken against this case's key
    floor: str | None = None  # "over floor" = median minus this case's median
    note: str = ""
    skipped: str = ""
    n: int = 0
    samples: list[float] = field(default_factory=list)  # ns per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def skipped(key: str, section: str, group: str, label: str, why: str, **kw: Any) -> Case:
    return Case(key, section, group, label, None, skipped=why, **kw)


def ratios(case: Case, by_key: dict[str, Case], against: str | None = None) -> Ratio:
    """Per-round ratios of ``case`` against its baseline (or ``against``), sampled in the same rounds."""
    base = by_key.get(against or case.baseline or "")
    return ratio(case.samples, base.samples) if base is not None else Ratio([])


def _timed(run: Runner, n: int) -> float:
    """ns per call of one batch of ``n`` calls, timed with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        return run(n) / n
    finally:
        gc.enable()


def calibrate(case: Case, batch_ns: float, start_n: int) -> None:
    """Find the batch size that takes about ``batch_ns`` (these runs also warm the case up)."""
    assert case.run is not None
    n = start_n
    while True:
        per_call = max(_timed(case.run, n), 0.001)
        if per_call * n >= batch_ns / 5:
            case.n = max(1, round(batch_ns / per_call))
            return
        n = min(n * 10, max(n * 2, round(batch_ns / per_call / 2)))


def measure(cases: list[Case], repeats: int, sample_ms: float, parts: int, start_n: int) -> None:
    """``repeats`` rounds. In a round every case runs ``parts`` batches (``sample_ms`` in all),
    interleaved with the other cases' batches; its sample for the round is its fastest batch.

    Interference from other processes only ever adds time, so the fastest batch is the least
    disturbed one, and interleaving gives every case the same chances at a quiet moment.
    Batches alternate direction (forward, backward), so each case stays next to the baseline
    listed just before it and no case is always first."""
    live = [c for c in cases if c.run is not None and not c.skipped]
    for c in live:
        calibrate(c, sample_ms * 1e6 / parts, start_n)
    for r in range(repeats):
        best = dict.fromkeys((c.key for c in live), float("inf"))
        gc.collect()
        gc.disable()
        try:
            for p in range(parts):
                for c in interleaved(live, r * parts + p):
                    assert c.run is not None
                    best[c.key] = min(best[c.key], c.run(c.n) / c.n)
        finally:
            gc.enable()
        for c in live:
            c.samples.append(best[c.key])
        progress(f"  round {r + 1}/{repeats} done")


# -- targets, options, JSON ------------------------------------------------------------------------


def verdict(text: str, met: bool, shown: str, value: Any, width: int = 55, **extra: Any) -> dict[str, Any]:
    """Print one target check (``[MET   ]`` or ``[MISSED]``) and return it for the JSON."""
    print(f"  [{'MET   ' if met else 'MISSED'}] {text:<{width}} {shown}")
    return {"target": text, "met": met, "value": value, **extra}


def parser(doc: str | None, *, quick: str, repeats: str | None = None) -> argparse.ArgumentParser:
    """The options every script has: ``--quick`` (help: ``quick``), ``--json``, ``--redis-server``,
    and ``--repeats`` when the script repeats its measurements (help: ``repeats``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    if repeats is not None:
        p.add_argument("--repeats", type=int, help=repeats)
    p.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    p.add_argument(
        "--redis-server",
        metavar="PATH",
        default=os.environ.get("TIERCACHE_REDIS_SERVER") or shutil.which("redis-server"),
        help="the redis-server binary to start (default: $TIERCACHE_REDIS_SERVER, else redis-server on PATH)",
    )
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if not args.redis_server:
        p.error("redis-server not found on PATH (apt-get install redis-server), or pass --redis-server PATH")
    return args


def write_json(path: str | Path, doc: Any) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {path}")
