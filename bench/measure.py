"""Timing and memory helpers: interleaved rounds, paired ratios, fresh-subprocess workers.

On a shared machine every runtime sees the same background load only if they run at the
same time, so runners are timed in interleaved rounds (A, B, C, A, B, C, ...) and every
ratio is the median over rounds of the per-round ratio.  Noise is reported as the
interquartile range of the per-round times relative to their median.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Timing", "interleaved", "ratio", "rss_mb", "cpu_seconds", "run_worker", "one_thread_as_parent"]


@dataclass
class Timing:
    rounds: np.ndarray        # per-round median seconds per call (CPU time of the process)
    wall: np.ndarray          # per-round median seconds per call (wall clock)

    @property
    def median(self) -> float:
        return float(np.median(self.rounds))

    @property
    def wall_median(self) -> float:
        return float(np.median(self.wall))

    @property
    def noise(self) -> float:
        """Interquartile range over median of the per-round times."""
        q1, q3 = np.percentile(self.rounds, [25, 75])
        return float((q3 - q1) / np.median(self.rounds))


def _calls_per_round(fn: Callable, budget: float) -> int:
    t = time.process_time()
    fn()
    dt = time.process_time() - t
    return int(np.clip(round(budget / max(dt, 1e-6)), 1, 200))


def interleaved(runners: dict[str, Callable], *, rounds: int, budget: float = 0.05,
                warmup: int = 3) -> dict[str, Timing]:
    """Time each runner in ``rounds`` interleaved rounds of about ``budget`` seconds each.

    Records both the process's CPU time (user + system, all threads) and the wall time per call.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    per = {k: _calls_per_round(fn, budget) for k, fn in runners.items()}
    cpu, wall = {k: [] for k in runners}, {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn, cs, ws = runners[k], [], []
            for _ in range(per[k]):
                c, t = time.process_time(), time.perf_counter()
                fn()
                ws.append(time.perf_counter() - t)
                cs.append(time.process_time() - c)
            cpu[k].append(float(np.median(cs)))
            wall[k].append(float(np.median(ws)))
    return {k: Timing(np.asarray(cpu[k]), np.asarray(wall[k])) for k in runners}


def ratio(a: Timing, b: Timing, *, wall: bool = False) -> tuple[float, float]:
    """Median over rounds of a/b (CPU time, or wall time), and the interquartile range of that ratio."""
    r = a.wall / b.wall if wall else a.rounds / b.rounds
    q1, q3 = np.percentile(r, [25, 75])
    return float(np.median(r)), float(q3 - q1)


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_worker(args: list[str], *, env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``bench/run.py --worker ...`` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "run.py"), "--worker", *args]
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(args)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def one_thread_as_parent(mljax) -> None:
    """``mljax.set_cpu_threads(1)`` in a worker whose parent ran single-threaded (``PJRT_NPROC=1`` in
    the inherited environment): its inline calls are a JAX config setting, which the environment
    does not carry.  Before the worker's first JAX computation."""
    if os.environ.get("PJRT_NPROC") == "1":
        mljax.set_cpu_threads(1)
