"""Plain NumPy loop references for the target kernels and the losses.

Written from the documented semantics, one time step at a time, so that the
tests compare the vectorised kernels with something independent of them. Each
reference takes the same arguments as the kernel it mirrors and works on any
batch shape by looping over the rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


class Row(NamedTuple):
    """One sequence, every field float32 or bool ``[T]`` except ``bootstrap``."""

    rewards: np.ndarray
    values: np.ndarray
    discounts: np.ndarray
    valid: np.ndarray
    cut: np.ndarray
    final_values: np.ndarray
    bootstrap: np.float32


def _rows(rewards, values, discounts, bootstrap_value, mask, truncated, final_values):
    """Yields ``(batch index, Row)`` for every sequence of the batch."""
    rewards = np.asarray(rewards, np.float32)
    shape = rewards.shape

    def full(x, fill, dtype):
        x = np.full(shape, fill, dtype) if x is None else np.asarray(x)
        return np.broadcast_to(x.astype(dtype), shape)

    values = full(values, 0.0, np.float32)
    discounts = full(discounts, 0.0, np.float32)
    valid = full(mask, True, bool)
    cut = full(truncated, False, bool)
    final_values = full(final_values, 0.0, np.float32)
    bootstrap_value = np.asarray(bootstrap_value, np.float32)
    for index in np.ndindex(shape[:-1]):
        yield (
            index,
            Row(
                rewards[index],
                values[index],
                discounts[index],
                valid[index],
                cut[index],
                final_values[index],
                bootstrap_value[index],
            ),
        )


def _successor(row: Row, t: int) -> tuple[np.float32, int | None]:
    """``(V(s_{t+1}), u)`` for valid t: u is the next valid step the recursion
    chains into, None at a truncation or after the last valid step."""
    if row.cut[t]:
        return row.final_values[t], None
    for u in range(t + 1, len(row.valid)):
        if row.valid[u]:
            return row.values[u], u
    return row.bootstrap, None


def _per_row(row_fn, *, per_step_args=False):
    """Lifts ``row_fn(row, *args) -> [T]`` to the batched kernel signature.

    With ``per_step_args`` the extra arguments broadcast to ``[..., T]`` and each
    row receives its own ``[T]`` slice.
    """

    def reference(
        rewards,
        values,
        discounts,
        bootstrap_value,
        *args,
        mask=None,
        truncated=None,
        final_values=None,
    ):
        shape = np.shape(rewards)
        if per_step_args:
            args = [np.broadcast_to(np.asarray(arg, np.float32), shape) for arg in args]
        out = np.zeros(shape, np.float32)
        rows = _rows(rewards, values, discounts, bootstrap_value, mask, truncated, final_values)
        for index, row in rows:
            row_args = [arg[index] for arg in args] if per_step_args else args
            out[index] = row_fn(row, *row_args)
        return out

    return reference


@_per_row
def td_targets(row: Row) -> np.ndarray:
    out = np.zeros(len(row.rewards), np.float32)
    for t in range(len(out)):
        if row.valid[t]:
            v_next, _ = _successor(row, t)
            out[t] = row.rewards[t] + row.discounts[t] * v_next
    return out


def td_errors(rewards, values, discounts, bootstrap_value, *, mask=None, **kwargs):
    targets = td_targets(rewards, values, discounts, bootstrap_value, mask=mask, **kwargs)
    valid = np.ones(np.shape(rewards), bool) if mask is None else np.asarray(mask) != 0
    errors = np.zeros(np.shape(rewards), np.float32)
    errors[valid] = targets[valid] - np.asarray(values, np.float32)[valid]
    return errors


@_per_row
def n_step_targets(row: Row, n: int) -> np.ndarray:
    out = np.zeros(len(row.rewards), np.float32)
    for t in range(len(out)):
        if not row.valid[t]:
            continue
        total, scale, step = np.float32(0), np.float32(1), t
        for k in range(n):
            total += scale * row.rewards[step]
            v_next, following = _successor(row, step)
            scale *= row.discounts[step]
            if following is None or k == n - 1:
                total += scale * v_next
                break
            step = following
        out[t] = total
    return out


def _row_returns(row: Row, lam: np.ndarray) -> np.ndarray:
    out = np.zeros(len(row.rewards), np.float32)
    for t in reversed(range(len(out))):
        if row.valid[t]:
            v_next, following = _successor(row, t)
            g_next = v_next if following is None else out[following]
            mix = (1 - lam[t]) * v_next + lam[t] * g_next
            out[t] = row.rewards[t] + row.discounts[t] * mix
    return out


lambda_returns = _per_row(_row_returns, per_step_args=True)


@functools.partial(_per_row, per_step_args=True)
def gae_advantages(row: Row, lam: np.ndarray) -> np.ndarray:
    out = np.zeros(len(row.rewards), np.float32)
    for t in reversed(range(len(out))):
        if row.valid[t]:
            v_next, following = _successor(row, t)
            delta = row.rewards[t] + row.discounts[t] * v_next - row.values[t]
            a_next = 0.0 if following is None else out[following]
            out[t] = delta + row.discounts[t] * lam[t] * a_next
    return out


def discounted_returns(rewards, discounts, bootstrap_value, **kwargs):
    values = np.zeros(np.shape(rewards), np.float32)
    return lambda_returns(rewards, values, discounts, bootstrap_value, 1.0, **kwargs)


# Losses and statistics.


def _weights(mask, shape) -> np.ndarray:
    """A bool or 0/1 mask, or non-negative weights, as float weights."""
    if mask is None:
        return np.ones(shape, np.float64)
    return np.broadcast_to(np.asarray(mask, np.float64), shape)


def _valid(mask, shape) -> np.ndarray:
    return _weights(mask, shape) != 0


def pointwise_loss(residual: float, kind: str, huber_delta: float) -> float:
    if kind == "mse" or abs(residual) <= huber_delta:
        return 0.5 * residual * residual
    return huber_delta * (abs(residual) - 0.5 * huber_delta)


def clipped_value(value: float, old_value: float, clip_epsilon: float) -> float:
    return old_value + min(max(value - old_value, -clip_epsilon), clip_epsilon)


def value_loss(
    values,
    targets,
    *,
    mask=None,
    old_values=None,
    clip_epsilon=None,
    kind="mse",
    huber_delta=1.0,
    aggregate="token_mean",
) -> float:
    values = np.asarray(values, np.float32)
    targets = np.asarray(targets, np.float32)
    weights = _weights(mask, values.shape)
    losses = np.zeros(values.shape, np.float64)
    for i in np.ndindex(values.shape):
        if weights[i] == 0:
            continue
        loss = pointwise_loss(values[i] - targets[i], kind, huber_delta)
        if old_values is not None:
            v_clip = clipped_value(values[i], old_values[i], clip_epsilon)
            loss = max(loss, pointwise_loss(v_clip - targets[i], kind, huber_delta))
        losses[i] = weights[i] * loss
    if aggregate == "sum":
        return float(losses.sum())
    if aggregate == "token_mean":
        return float(losses.sum() / weights.sum()) if weights.any() else 0.0
    row_means = []
    for i in np.ndindex(values.shape[:-1]):
        if weights[i].any():
            row_means.append(losses[i].sum() / weights[i].sum())
    return float(np.mean(row_means)) if row_means else 0.0


def masked_mean(x, mask=None) -> float:
    x = np.asarray(x, np.float64)
    weights = _weights(mask, x.shape)
    total = 0.0
    for i in np.ndindex(x.shape):
        if weights[i] != 0:
            total += weights[i] * x[i]
    return float(total / weights.sum()) if weights.any() else 0.0


def masked_whiten(x, mask=None, eps=1e-8) -> np.ndarray:
    x = np.asarray(x, np.float32)
    valid = _valid(mask, x.shape)
    picked = x[valid]
    out = np.zeros(x.shape, np.float32)
    out[valid] = (picked - picked.mean()) / np.sqrt(picked.var() + eps)
    return out


def explained_variance(values, targets, mask=None) -> float:
    valid = _valid(mask, np.shape(targets))
    y = np.asarray(targets, np.float32)[valid]
    v = np.asarray(values, np.float32)[valid]
    if y.size == 0 or np.all(y == y[0]):
        return 0.0
    return float(1 - np.var(y - v) / np.var(y))


def clip_fraction(values, targets, old_values, clip_epsilon, *, mask=None) -> float:
    values = np.asarray(values, np.float32)
    valid = _valid(mask, values.shape)
    active = []
    for i in np.ndindex(values.shape):
        if valid[i]:
            # In float64 old + (v - old) is v exactly, as in exact arithmetic.
            v, old, y = (float(x[i]) for x in (values, old_values, targets))
            v_clip = clipped_value(v, old, clip_epsilon)
            active.append((v_clip - y) ** 2 > (v - y) ** 2)
    return float(np.mean(active)) if active else 0.0
