"""Trace-time argument checks shared by the kernels and losses.

Every check runs on static shapes and dtypes, so it costs nothing under ``jit``
and fails before any computation with a message naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def as_real(name: str, x, *, allow_bool: bool = False) -> Array:
    """``x`` as an array of real numbers; bool only where ``allow_bool``."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError) as err:  # a ragged list, None, a string
        raise ValueError(
            f"{name} must be an array of real numbers, got {type(x).__name__}"
        ) from err
    if x.dtype == jnp.bool_ and allow_bool:
        return x
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        kinds = "bool, integer or floating" if allow_bool else "integer or floating"
        raise ValueError(f"{name} must have a {kinds} dtype, got {x.dtype}")
    return x


def check_shape(name: str, x: Array, shape: tuple[int, ...]) -> Array:
    if x.shape != tuple(shape):
        raise ValueError(f"{name} has shape {x.shape}, expected {tuple(shape)}")
    return x


def check_broadcastable(name: str, x: Array, shape: tuple[int, ...]) -> Array:
    """Checks that ``x`` broadcasts to ``shape`` without changing it."""
    try:
        result = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        result = None
    if result != tuple(shape):
        raise ValueError(f"{name} has shape {x.shape}, which does not broadcast to {tuple(shape)}")
    return x


def check_positive(name: str, x) -> None:
    """Checks a scalar setting that may be traced: its rank always, its sign where known."""
    if x is None or isinstance(x, bool) or np.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar > 0, got {x!r}")
    as_real(name, x)
    known = concrete_or_none(x)
    if known is not None and not known > 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")


def concrete_or_none(x) -> np.ndarray | None:
    """The value of ``x`` as NumPy if it is known at trace time, else None."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None
