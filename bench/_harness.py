"""Shared timing helpers for the benchmarks in this folder.

Machines here are shared and noisy, so a benchmark never reports a bare number alone: it
measures our operation and a raw baseline doing the same work in the same run, interleaved,
several times, and reports the medians and their ratio. A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Op = Callable[[int], None]  # runs an operation n times


@dataclass
class Comparison:
    """Median time per operation of ours and of the baseline."""

    name: str
    ours_s: float
    base_s: float
    target: str = ""
    runs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Our time per operation over the baseline's (lower is better, 1.0 is parity)."""
        return self.ours_s / self.base_s

    def line(self) -> str:
        ours_rate = 1.0 / self.ours_s
        base_rate = 1.0 / self.base_s
        target = f"  target: {self.target}" if self.target else ""
        return (
            f"{self.name:<42} ours {ours_rate:>12,.0f} ops/s  baseline {base_rate:>12,.0f} ops/s  "
            f"time ratio {self.ratio:5.2f}x  (throughput {base_rate and ours_rate / base_rate:4.2f}x)"
            f"{target}"
        )


def time_per_op(op: Op, n: int) -> float:
    """Seconds per operation for one run of ``op(n)``."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        op(n)
        return (time.perf_counter() - start) / n
    finally:
        if gc_was:
            gc.enable()


def compare(
    name: str,
    ours: Op,
    baseline: Op,
    *,
    n: int,
    runs: int = 7,
    target: str = "",
    warmup: bool = True,
) -> Comparison:
    """Interleave runs of ours and the baseline; keep the median of each."""
    if warmup:
        ours(max(1, n // 10))
        baseline(max(1, n // 10))
    ours_t: list[float] = []
    base_t: list[float] = []
    for i in range(runs):
        # Alternate which goes first so drift in machine load hits both alike.
        if i % 2:
            base_t.append(time_per_op(baseline, n))
            ours_t.append(time_per_op(ours, n))
        else:
            ours_t.append(time_per_op(ours, n))
            base_t.append(time_per_op(baseline, n))
    result = Comparison(name, statistics.median(ours_t), statistics.median(base_t), target, runs)
    print(result.line(), flush=True)
    return result


def rss_bytes() -> int:
    """Resident memory of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def header(title: str) -> None:
    print(f"\n== {title} ==  (python {sys.version.split()[0]}, {os.cpu_count()} cpus)", flush=True)


def save_json(path: str | None, results: list[Comparison], **extra: Any) -> None:
    """Write results as JSON when a path is given (for the changelog and closing notes)."""
    if not path:
        return
    data = {
        "results": [
            {
                "name": r.name,
                "ours_ops_per_s": 1.0 / r.ours_s,
                "baseline_ops_per_s": 1.0 / r.base_s,
                "time_ratio": r.ratio,
                "target": r.target,
                "runs": r.runs,
                **r.extra,
            }
            for r in results
        ],
        **extra,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


#: The release the budget-model figures compare with (0.5.0, before scopes, periods and exact money).
PREVIOUS_RELEASE = "71c1d72"
#: 0.6.0, before the spend ledger and thresholds (issue 17's figures compare with it).
RELEASE_0_6 = "8e46e75"
_VERSION_CHILD = r"""
import sys, time
{setup}
op({n} // 10)
start = time.perf_counter()
op({n})
print((time.perf_counter() - start) / {n})
{teardown}
"""


def previous_release_src(release: str = PREVIOUS_RELEASE) -> str:
    """The ``src`` folder of ``release``, checked out once as a git worktree in /tmp."""
    import subprocess
    import tempfile

    root = os.path.join(tempfile.gettempdir(), f"iron-state-{release}")
    if not os.path.isdir(root):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(
            ["git", "-C", repo, "worktree", "add", "--detach", root, release],
            check=True,
            capture_output=True,
        )
    return os.path.join(root, "src")


def compare_with_previous_release(
    name: str,
    setup: str,
    *,
    n: int,
    runs: int = 7,
    teardown: str = "",
    target: str = "",
    release: str = PREVIOUS_RELEASE,
) -> Comparison:
    """Time the same code on this tree ("ours") and on ``release`` ("baseline").

    ``setup`` is Python that defines ``op(count)`` with ``iron_runtime_state`` imported from
    whichever tree runs it. Each run is a fresh process; the two trees alternate and the medians
    are compared, as in :func:`compare`.
    """
    import subprocess

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    trees = {"ours": here, "base": previous_release_src(release)}
    code = _VERSION_CHILD.format(setup=setup, teardown=teardown, n=n)
    times: dict[str, list[float]] = {"ours": [], "base": []}
    for i in range(runs):
        for kind in ("ours", "base") if i % 2 == 0 else ("base", "ours"):
            env = dict(os.environ, PYTHONPATH=trees[kind])
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            times[kind].append(float(out.stdout.split()[-1]))
    result = Comparison(
        name, statistics.median(times["ours"]), statistics.median(times["base"]), target, runs
    )
    print(result.line(), flush=True)
    return result
