"""Value losses and the statistics reported beside them.

All functions take predictions and targets of one shape ``[..., T]`` (any
shape works; the last axis is the one ``aggregate="sequence_mean"`` averages
over first) and an optional ``mask`` of 1 for steps that count. Masked steps
are excluded with ``jnp.where``, so junk there (even NaN) changes nothing, and
an all-masked batch gives 0, never NaN.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from valuefn._checks import as_real, check_broadcastable, check_positive, check_shape

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

LossKind = Literal["mse", "huber"]
Aggregate = Literal["token_mean", "sequence_mean", "sum"]

KINDS = ("mse", "huber")
AGGREGATES = ("token_mean", "sequence_mean", "sum")


def _weights(name: str, mask: ArrayLike | None, shape: tuple[int, ...]) -> Array:
    """Mask as float32 weights broadcast to ``shape`` (ones where absent)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = check_broadcastable(name, as_real(name, mask, allow_bool=True), shape)
    return jnp.broadcast_to(mask.astype(jnp.float32), shape)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator``, and 0 where the denominator is 0."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def masked_mean(x: ArrayLike, mask: ArrayLike | None = None, axis=None) -> Array:
    """Mean of ``x`` over the steps where ``mask`` is non-zero; 0 where none are.

    Args:
      x: any shape.
      mask: broadcastable to ``x.shape``; 1 (or a non-negative weight) where
        the step counts.
      axis: axes to reduce, as in ``jnp.mean``.

    Returns:
      ``sum(mask * x) / sum(mask)`` over ``axis``, float32.
    """
    x = as_real("x", x)
    weights = _weights("mask", mask, x.shape)
    return _safe_divide(
        jnp.sum(jnp.where(weights != 0, x * weights, 0.0), axis=axis),
        jnp.sum(weights, axis=axis),
    ).astype(jnp.float32)


def masked_whiten(
    x: ArrayLike, mask: ArrayLike | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> Array:
    """``(x - mean) / sqrt(var + eps)`` with the masked mean and (population) variance.

    Args:
      x: any shape; statistics are over all of it.
      mask: broadcastable to ``x.shape``.
      shift_mean: if False the mean is added back, scaling only (as PPO
        implementations do for advantages of a baseline-free reward).
      eps: added to the variance.

    Returns:
      float32 array of ``x.shape``; masked entries are 0.
    """
    check_positive("eps", eps)
    x = as_real("x", x).astype(jnp.float32)
    weights = _weights("mask", mask, x.shape)
    x = jnp.where(weights != 0, x, 0.0)  # junk there would send NaN gradients back
    mean = masked_mean(x, weights)
    variance = masked_mean(jnp.square(x - mean), weights)
    whitened = (x - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(weights != 0, whitened, 0.0)


def explained_variance(
    values: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None
) -> Array:
    """``1 - Var[targets - values] / Var[targets]`` over the masked steps.

    1 is a perfect critic, 0 is no better than predicting the mean target,
    negative is worse. Returns 0 where the targets have no variance, or no steps.

    Args:
      values: predictions ``V(s_t)``, any shape ``[..., T]``.
      targets: the targets they were trained towards, the same shape.
      mask: 1 where a step counts, 0 where not; broadcast to the shape (None:
        every step). Masked steps may hold anything, NaN included.

    Returns:
      A float32 scalar over all valid steps (one statistic for the whole batch).
    """
    values, targets = _check_pair(values, targets)
    weights = _weights("mask", mask, targets.shape)
    if targets.size == 0:
        return jnp.zeros((), jnp.float32)
    valid = weights != 0
    values, targets = jnp.where(valid, values, 0.0), jnp.where(valid, targets, 0.0)
    first_valid = jnp.argmax(weights.ravel() != 0)

    def variance(x):
        # Shifted by one valid entry, constant targets have exactly zero variance;
        # the rounding error of their mean would otherwise leave a tiny positive one.
        x = x - x.ravel()[first_valid]
        return masked_mean(jnp.square(x - masked_mean(x, weights)), weights)

    var_targets = variance(targets)
    return jnp.where(
        var_targets > 0, 1.0 - _safe_divide(variance(targets - values), var_targets), 0.0
    )


def _check_pair(values: ArrayLike, targets: ArrayLike) -> tuple[Array, Array]:
    values = as_real("values", values)
    targets = check_shape("targets", as_real("targets", targets), values.shape)
    return values.astype(jnp.float32), targets.astype(jnp.float32)


def _pointwise(residual: Array, kind: str, huber_delta: float) -> Array:
    if kind == "mse":
        return 0.5 * jnp.square(residual)
    return optax.losses.huber_loss(residual, delta=huber_delta)


def _clipped_values(values: Array, old_values: Array, clip_epsilon: float) -> Array:
    return old_values + jnp.clip(values - old_values, -clip_epsilon, clip_epsilon)


def _check_clip(
    values: Array, old_values: ArrayLike | None, clip_epsilon: float | None
) -> Array | None:
    if (old_values is None) != (clip_epsilon is None):
        raise ValueError(
            "old_values and clip_epsilon go together: pass both for the clipped loss, or neither"
        )
    if old_values is None:
        return None
    check_positive("clip_epsilon", clip_epsilon)
    old = check_shape("old_values", as_real("old_values", old_values), values.shape)
    return old.astype(jnp.float32)


def value_loss(
    values: ArrayLike,
    targets: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    old_values: ArrayLike | None = None,
    clip_epsilon: float | None = None,
    kind: LossKind = "mse",
    huber_delta: float = 1.0,
    aggregate: Aggregate = "token_mean",
    stop_target_gradients: bool = True,
) -> Array:
    """Value regression loss.

    Per step, ``mse`` is ``0.5 * (v - y)^2`` and ``huber`` is the Huber loss with
    threshold ``huber_delta`` (equal to mse inside it). With ``old_values`` and
    ``clip_epsilon`` it is the PPO clipped form
    ``max(l(v - y), l(v_clip - y))``, ``v_clip = v_old + clip(v - v_old, -eps, eps)``.

    The targets are held constant: no gradient flows into them unless
    ``stop_target_gradients=False`` (a residual-gradient method). Compute them
    with the kernels in :mod:`valuefn.targets`.

    Args:
      values: predictions ``V(s_t)``, ``[..., T]``.
      targets: same shape as ``values``.
      mask: optional, broadcastable to ``values.shape``: 1 where a step counts
        and 0 where not, or a non-negative weight for each step (the means
        then divide by the sum of the weights).
      old_values: predictions of the critic that collected the data.
      clip_epsilon: clip range for the clipped loss, a scalar > 0 (traced is
        fine, e.g. from a schedule).
      kind: ``"mse"`` or ``"huber"``.
      huber_delta: Huber threshold, a scalar > 0 (traced is fine).
      aggregate: ``"token_mean"`` (mean over all valid steps),
        ``"sequence_mean"`` (mean over each sequence's valid steps, then over
        sequences that have any) or ``"sum"``.
      stop_target_gradients: hold ``targets`` constant (the default).

    Returns:
      float32 scalar; 0 when every step is masked.

    References:
      Schulman et al., Proximal Policy Optimization Algorithms, 2017;
      Huber, Robust Estimation of a Location Parameter, 1964.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if kind == "huber":
        check_positive("huber_delta", huber_delta)
    values, targets = _check_pair(values, targets)
    if stop_target_gradients:
        targets = jax.lax.stop_gradient(targets)
    old = _check_clip(values, old_values, clip_epsilon)
    weights = _weights("mask", mask, values.shape)
    # Zero the masked steps before any arithmetic: masking only the result would
    # still send NaN gradients (0 * NaN) back from junk there.
    valid = weights != 0
    values, targets = jnp.where(valid, values, 0.0), jnp.where(valid, targets, 0.0)
    if old is not None:
        old = jnp.where(valid, old, 0.0)

    losses = _pointwise(values - targets, kind, huber_delta)
    if old is not None:
        clipped = _pointwise(
            _clipped_values(values, old, clip_epsilon) - targets, kind, huber_delta
        )
        losses = jnp.maximum(losses, clipped)
    losses = jnp.where(weights != 0, losses * weights, 0.0)

    if aggregate == "sum":
        return jnp.sum(losses)
    if aggregate == "token_mean":
        return _safe_divide(jnp.sum(losses), jnp.sum(weights))
    if values.ndim == 0:
        return _safe_divide(losses, weights)
    per_sequence = _safe_divide(jnp.sum(losses, axis=-1), jnp.sum(weights, axis=-1))
    has_steps = (jnp.sum(weights, axis=-1) != 0).astype(jnp.float32)
    return _safe_divide(jnp.sum(per_sequence), jnp.sum(has_steps))


def clip_fraction(
    values: ArrayLike,
    targets: ArrayLike,
    old_values: ArrayLike,
    clip_epsilon: float,
    *,
    mask: ArrayLike | None = None,
) -> Array:
    """Fraction of valid steps where the clipped term of the PPO value loss is active.

    That is where ``(v_clip - y)^2 > (v - y)^2``, so the gradient is cut off;
    a value within ``clip_epsilon`` of its old value is never counted.

    Args:
      values: predictions ``V(s_t)``, any shape ``[..., T]``.
      targets: the value targets, the same shape.
      old_values: the predictions when the batch was collected, the same shape.
      clip_epsilon: the clip range, as given to :func:`value_loss`; > 0.
      mask: 1 where a step counts, 0 where not (None: every step).

    Returns:
      A float32 scalar in [0, 1] (0 where no step is valid).
    """
    values, targets = _check_pair(values, targets)
    old = _check_clip(values, old_values, clip_epsilon)
    clipped = _clipped_values(values, old, clip_epsilon)
    # Inside the range old + (v - old) rounds to v give or take an ulp, which must
    # not count as clipped.
    outside = jnp.abs(values - old) > clip_epsilon
    active = outside & (jnp.square(clipped - targets) > jnp.square(values - targets))
    return masked_mean(active.astype(jnp.float32), mask)
