"""What ``valuefn train`` shows a person: progress, plots and the by-turn report."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Early turns whose mean value falls short of their mean realised return by more
# than this fraction of the return's scale are reported as under-valued.
UNDERVALUED_FRACTION = 0.25


@contextlib.contextmanager
def progress(
    total: int, start: int = 0, *, enabled: bool = True
) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over iterations; yields ``advance(metrics)`` to call after each."""
    if not enabled:
        yield lambda metrics: None
        return
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, status="compiling")

        def advance(metrics: dict[str, Any]) -> None:
            status = (
                f"loss {metrics['value_loss']:.4f}  "
                f"expl.var {metrics['explained_variance']:.3f}  "
                f"score {metrics['score_mean']:.3f}"
            )
            bar.update(task, advance=1, status=status)

        yield advance


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Value loss and explained variance against iteration, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [h["iteration"] for h in history]
    figure, (loss_axis, ev_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(iterations, [h["value_loss"] for h in history])
    loss_axis.set(xlabel="iteration", ylabel="value loss", yscale="log", title="Value loss")
    ev_axis.plot(iterations, [h["explained_variance"] for h in history])
    ev_axis.set(xlabel="iteration", ylabel="explained variance", title="Explained variance")
    finite = [h["explained_variance"] for h in history if math.isfinite(h["explained_variance"])]
    ev_axis.set_ylim(min([-0.1, *finite]), 1.0)
    for axis in (loss_axis, ev_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_value_by_turn(metrics: dict[str, Any], path: Path) -> None:
    """Mean predicted value beside mean realised return for each turn, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values, returns = metrics["value_by_turn"], metrics["return_by_turn"]
    turns = np.arange(len(values))
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(turns - 0.2, values, width=0.4, label="mean predicted value")
    axis.bar(turns + 0.2, returns, width=0.4, label="mean realised return")
    axis.set(xlabel="assistant turn", ylabel="value", xticks=turns)
    axis.set_title(f"Value by turn (iteration {metrics['iteration']})")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def undervalued_turns(metrics: dict[str, Any]) -> list[int]:
    """The turns before the last whose mean value sits far below their realised return.

    That is the failure in which a critic values only the last turn (a small
    per-token discount, say): the policy then learns to end conversations early.
    """
    values, returns = metrics["value_by_turn"], metrics["return_by_turn"]
    scale = max([abs(r) for r in returns if math.isfinite(r)] + [1e-6])
    return [
        k for k in range(len(values) - 1) if returns[k] - values[k] > UNDERVALUED_FRACTION * scale
    ]


def print_summary(metrics: dict[str, Any], out: Path, console: Console | None = None) -> None:
    """The final metrics, the value-by-turn table and any under-valued-turn warning."""
    console = console or Console()
    console.print(
        f"iteration {metrics['iteration']}: value loss {metrics['value_loss']:.4f}, "
        f"explained variance {metrics['explained_variance']:.3f}, "
        f"clip fraction {metrics['clip_fraction']:.3f}, score {metrics['score_mean']:.3f}"
    )
    table = Table(title="Value against realised return by assistant turn")
    for header in ("turn", "mean value", "mean realised return", "value - return"):
        table.add_column(header, justify="right")
    for k, (value, ret) in enumerate(
        zip(metrics["value_by_turn"], metrics["return_by_turn"], strict=True)
    ):
        table.add_row(str(k), f"{value:.3f}", f"{ret:.3f}", f"{value - ret:+.3f}")
    console.print(table)
    for k in undervalued_turns(metrics):
        console.print(
            f"[bold yellow]warning:[/] turn {k} is valued at {metrics['value_by_turn'][k]:.3f} "
            f"but realises {metrics['return_by_turn'][k]:.3f} on average: the critic gives "
            "early turns too little value (is the per-token discount too small?), which "
            "teaches a policy to end conversations early"
        )
    console.print(f"results in {out}")
