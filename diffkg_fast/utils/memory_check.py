"""Refuse, before anything is allocated, a run whose live memory cannot fit in this machine's.

A run too big for the host is otherwise killed by the kernel's out-of-memory killer part-way
through its set-up or its first batch: no Python error, no message, nothing written. Each model
may give :meth:`~diffkg_fast.model.base.Recommender.memory_estimate`: the big tensors its
training holds, each with the options that shrink it. This module adds them up (the state that
lives the whole run, plus the largest one-phase working set) and compares the sum with the
memory the kernel says is available now (``MemAvailable``). The estimate is a lower bound of the
peak (it leaves out the interpreter, the dataset, the graphs and the allocator's slack: the
Alibaba-shape run's estimate is 4.9 GB, its measured peak 7.6 GiB), so the check refuses what
cannot fit and never promises that what passes will.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from diffkg_fast.data.errors import DataError

__all__ = ["MemoryTerm", "available_bytes", "check_memory", "peak_lower_bound"]

GB = 1e9


class MemoryTerm(NamedTuple):
    """One big tensor group of a run: what it is, its bytes, whether it lives the whole run
    (``persistent``) or one phase at a time, and the options that make it smaller."""

    what: str
    bytes: int
    persistent: bool
    shrink: str


def available_bytes() -> int | None:
    """The kernel's estimate of the memory a new allocation can get without swapping
    (``MemAvailable`` of ``/proc/meminfo``); ``None`` where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_lower_bound(terms: list[MemoryTerm]) -> int:
    """Every persistent term plus the largest one-phase term (phases run one after another)."""
    phase = [t.bytes for t in terms if not t.persistent]
    return sum(t.bytes for t in terms if t.persistent) + max(phase, default=0)


def check_memory(ds: Any, config: Any, available: int | None = None) -> None:
    """Raise :class:`DataError` (field ``memory``) when the run's :func:`peak_lower_bound`
    exceeds ``available`` bytes (default: :func:`available_bytes`), listing the biggest terms
    and what to change. Models without an estimate, and hosts without ``/proc/meminfo``, pass."""
    terms = config.model_cls.memory_estimate(ds, config)
    available = available_bytes() if available is None else available
    if not terms or available is None:
        return
    need = peak_lower_bound(terms)
    if need <= available:
        return
    lines = [f"{t.what}: {t.bytes / GB:.1f} GB ({t.shrink})"
             for t in sorted(terms, key=lambda t: -t.bytes) if t.bytes >= 0.05 * need]
    raise DataError(
        f"this run needs at least {need / GB:.1f} GB but the machine has {available / GB:.1f} GB "
        f"available; the biggest parts: " + "; ".join(lines), field="memory")
