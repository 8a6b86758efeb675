"""Save and restore a :class:`valuefn.TrainState` with Orbax, numbered by training step.

A checkpoint directory holds one subdirectory per saved step (``<directory>/<step>``),
each with every array of the state (step counter, parameters, optimiser state,
return statistics) stored exactly, so training resumed from it continues bit for
bit as if it had not stopped. Restoring needs a ``target`` of the same structure,
e.g. a freshly initialised state: it fixes the pytree types (the NamedTuples of
the optimiser state), the dtypes and, when the state is sharded, the shardings.

Usage::

    checkpoint.save("runs/critic/checkpoint", state, step=100)
    state, step = checkpoint.restore("runs/critic/checkpoint", target=fresh_state)
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from valuefn.train import TrainState


def _directory(directory: str | os.PathLike) -> pathlib.Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return pathlib.Path(directory).expanduser().resolve()


def _check_state(name: str, state: TrainState) -> None:
    if not isinstance(state, TrainState):
        raise ValueError(f"{name} must be a valuefn.TrainState, got {type(state).__name__}")


def _manager(directory: pathlib.Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    # The handler named up front lets the manager read a checkpoint's metadata
    # before anything is restored through it.
    return ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape by its path, written the same for a state and for Orbax's
    metadata of it (which stores NamedTuples as dicts and tuples as lists): the
    keys' simple forms name a field, a dict key and an index alike."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _misfits(saved: Any, target: Any, most: int = 4) -> list[str]:
    """What keeps the checkpoint's arrays ``saved`` from filling ``target``, leaf by
    leaf (at most ``most`` of each kind), or nothing when they fit."""
    saved, target = _shapes_by_path(saved), _shapes_by_path(target)
    shapes = [
        f"{path} is {saved[path]} in the checkpoint and {shape} in target"
        for path, shape in target.items()
        if path in saved and saved[path] != shape
    ]
    missing = [path for path in target if path not in saved]
    extra = [path for path in saved if path not in target]

    def listed(items: list[str]) -> str:
        more = f" and {len(items) - most} more" if len(items) > most else ""
        return ", ".join(items[:most]) + more

    misfits = shapes[:most]
    if len(shapes) > most:
        misfits.append(f"{len(shapes) - most} more leaves of other shapes")
    if missing:
        misfits.append(f"not in the checkpoint: {listed(missing)}")
    if extra:
        misfits.append(f"not in target: {listed(extra)}")
    return misfits


def save(
    directory: str | os.PathLike,
    state: TrainState,
    step: int,
    *,
    max_to_keep: int | None = 3,
) -> pathlib.Path:
    """Writes ``state`` as checkpoint ``step`` under ``directory`` and waits until it is on disk.

    Args:
      directory: the run's checkpoint directory (created if missing; relative
        paths are resolved against the working directory).
      state: the :class:`TrainState` to save; it stays usable afterwards.
      step: the number to save it under, an int >= 0 (e.g. iterations done); an
        existing checkpoint with that number is replaced. The latest checkpoint
        is the one with the highest number, so ``directory`` must hold none
        numbered above ``step``.
      max_to_keep: keep only this many most recent checkpoints (None: all).

    Returns:
      The absolute path of the checkpoint directory.
    """
    _check_state("state", state)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep!r}")
    directory = _directory(directory)
    with _manager(directory, max_to_keep) as manager:
        steps = manager.all_steps()
        later = [s for s in steps if s > step]
        if later:
            raise ValueError(
                f"step {step} is below the checkpoints {sorted(later)} in {str(directory)!r}, "
                f"which restore would take as the latest: save into another directory, "
                f"or delete them first"
            )
        if step in steps:
            manager.delete(step)
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    return directory


def restore(
    directory: str | os.PathLike, target: TrainState, step: int | None = None
) -> tuple[TrainState, int]:
    """Reads a :class:`TrainState` saved by :func:`save`.

    Args:
      directory: the run's checkpoint directory.
      target: a state of the same structure (e.g. from
        :func:`valuefn.init_train_state`), with concrete arrays or
        ``jax.ShapeDtypeStruct`` leaves; its dtypes and shardings are used.
      step: which checkpoint; None for the latest.

    Returns:
      ``(state, step)``: the saved state with ``target``'s pytree structure, and
      the number it was saved under.
    """
    _check_state("target", target)
    directory = _directory(directory)
    if not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} does not exist")
    with _manager(directory) as manager:
        steps = manager.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"directory {str(directory)!r} holds no checkpoint")
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint for step {step!r} in {str(directory)!r}; has {steps}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        misfit = (
            f"the checkpoint for step {step} in {str(directory)!r} does not fit target, "
            f"a state of another model or optimiser (sizes, layers or scan_layers differ)"
        )
        # Checked before reading: a restore that fails part way leaves Orbax's
        # reads of the other arrays abandoned, and names no leaf.
        saved = manager.item_metadata(step)
        misfits = [] if saved is None else _misfits(saved, abstract)
        if misfits:
            raise ValueError(f"{misfit}: {'; '.join(misfits)}")
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as err:
            raise ValueError(f"{misfit}: {err}") from err
    return state, step


def latest_step(directory: str | os.PathLike) -> int | None:
    """The number of the newest checkpoint under ``directory``, or None if there is none."""
    directory = _directory(directory)
    if not directory.is_dir():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()
