"""Figures, timing and the table shared by every benchmark of the suite."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Timing(NamedTuple):
    """Wall times of one function over ``repeats`` rounds of :func:`measure_many`.

    ``times`` are the rounds' times in round order, and ``run`` numbers the
    :func:`measure_many` call that took them: two timings of the same run were
    taken in the same rounds, so their times pair up round by round.
    """

    median: float  # seconds
    min: float
    max: float
    repeats: int
    times: tuple[float, ...] = ()
    run: int | None = None


class Skipped(NamedTuple):
    """What a benchmark yields for a part it leaves out, and why: the results
    file lists it under ``skipped`` as ``"<benchmark>: <what>"``, or as
    ``"<benchmark>"`` where ``what`` is empty (the whole benchmark)."""

    what: str
    reason: str


class Figure(NamedTuple):
    """One measured figure of the suite.

    Every unit the suite uses (seconds, bytes) is lower-is-better, so
    ``ratio = baseline_median / median`` is a speed-up: above 1 the figure beats
    its baseline.

    Attributes:
      name: what was measured, with its shape, e.g. ``"gae auto 256x4096"``.
      median, min, max: over the repeats, in ``unit``.
      unit: ``"s"`` or ``"bytes"``.
      baseline: what the figure is compared with, or None.
      baseline_median: the baseline's median, in ``unit``, measured in the same run.
      baseline_min, baseline_max: the baseline's spread where it was timed
        (:func:`timed` with ``against``), else None.
      work: how much one call processes (tokens, steps, bytes, FLOPs), for a rate.
      work_unit: the unit of ``work``.
      floor: the hardware limit the figure is held against, a figure name of
        :mod:`valuefn.bench.hardware` (``"memory bandwidth"``, ``"matmul float32"``,
        ``"matmul bfloat16"``), or None.
      floor_work: the bytes that must move or the FLOPs that must run in one call.
      wins, rounds: where the figure and its baseline were timed in the same
        rounds, the rounds in which the figure took less time than the
        baseline, out of ``rounds``: how often the figure is ahead, where the
        ratio of the medians says by how much. None otherwise.
    """

    name: str
    median: float
    min: float
    max: float
    unit: str = "s"
    baseline: str | None = None
    baseline_median: float | None = None
    work: float | None = None
    work_unit: str | None = None
    floor: str | None = None
    floor_work: float | None = None
    wins: int | None = None
    rounds: int | None = None
    baseline_min: float | None = None
    baseline_max: float | None = None

    @property
    def ratio(self) -> float | None:
        """``baseline_median / median``: the speed-up over the baseline."""
        if self.baseline_median is None:
            return None
        return self.baseline_median / self.median

    @property
    def rate(self) -> float | None:
        """``work / median``: e.g. tokens per second."""
        return None if self.work is None else self.work / self.median


def timed(
    name: str,
    timing: Timing,
    *,
    against: tuple[str, Timing] | None = None,
    **fields,
) -> Figure:
    """A figure in seconds from a :class:`Timing`, compared ``against`` a named timing.

    Where both timings come from the same :func:`measure_many` call, the figure
    also counts the rounds it won (:attr:`Figure.wins`).
    """
    if against is not None:
        name_against, baseline = against
        fields.update(
            baseline=name_against,
            baseline_median=baseline.median,
            baseline_min=baseline.min,
            baseline_max=baseline.max,
        )
        if timing is not baseline and timing.run is not None and timing.run == baseline.run:
            pairs = list(zip(timing.times, baseline.times, strict=True))
            fields.update(wins=sum(t < b for t, b in pairs), rounds=len(pairs))
    return Figure(name, timing.median, timing.min, timing.max, "s", **fields)


def optional(name: str):
    """The module ``name`` for an optional baseline, or None where it is not installed."""
    try:
        return __import__(name)
    except ImportError:
        return None


def baseline_torch(what: str) -> tuple[Any, list[Skipped]]:
    """``torch`` for the PyTorch baseline ``what``, or None: where it is not
    installed, and where JAX runs on an accelerator, since the baselines run on
    the CPU; with the :class:`Skipped` to yield in that last case."""
    torch = optional("torch")
    if torch is None or jax.default_backend() == "cpu":
        return torch, []
    return None, [Skipped(what, f"it runs on the CPU, JAX on {jax.default_backend()}")]


_RUNS = itertools.count()


def _wall_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1) -> Timing:
    """Wall time of ``fn()`` with results blocked on, after ``warmup`` untimed calls."""
    return measure_many({"": fn}, repeats=repeats, warmup=warmup)[""]


def measure_many(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    back_to_back: bool = False,
) -> dict[str, Timing]:
    """Wall times of several functions, taken in turn: one call of each per round.

    On a machine shared with other work the load changes from second to second;
    interleaving puts the same load on every function, so their ratios hold even
    when the absolute times wander. Each round takes the functions in a new
    order, shuffled with a fixed seed, so that no function always comes after
    the same one: a call that leaves the machine slow for the next one taxes
    each of the others in turn, not one of them in every round. (A JAX call
    straight after the PyTorch GAE loop, 0.1 s of one busy core, took 1.5x to
    10x its time after another JAX call, at 8 x 8192 on the 2-core benchmark
    machine.)

    With ``back_to_back`` each timed call comes straight after an untimed call of
    the same function, as steps do in a training loop. Without it a call follows
    the other functions' turns, and on a virtual machine that hands idle memory
    back to its host (the benchmark machine does within a second or two) a call
    that maps large buffers afresh, as XLA:CPU does its temporaries on every
    call, first waits for the host to back them again: 2 to 4 s of kernel time
    for one update step of the reference critic, against 0.2 s back to back.
    Short calls pay for a pause too: after the PyTorch GAE loop's turn (0.1 s
    in which XLA's threads idle), GAE took 1.3x its back-to-back time at
    256 x 4096 and 1.9x at 8 x 8192, rlax's as much, with or without the cache
    flushed in between; GAE's comparisons are timed back to back for that.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = fns[name]
            if back_to_back:
                jax.block_until_ready(fn())
            times[name].append(_wall_time(fn))
    run = next(_RUNS)
    return {
        name: Timing(statistics.median(t), min(t), max(t), repeats, tuple(t), run)
        for name, t in times.items()
    }


def format_table(headers: list[str], rows: list[list[object]], *, markdown: bool = False) -> str:
    """A plain-text (or Markdown) table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [line(row) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
