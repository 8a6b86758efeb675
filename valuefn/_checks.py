"""Trace-time argument checks shared by the kernels and losses.

Every check runs on static shapes and dtypes, so it costs nothing under ``jit``
and fails before any computation with a message naming the argument.
"""

from __future__ import annotations

import math
import numbers
import types
import typing

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
        kinds = "a bool, integer or floating" if allow_bool else "an integer or floating"
        raise ValueError(f"{name} must have {kinds} dtype, got {x.dtype}")
    return x


def check_shape(name: str, x: Array, shape: tuple[int, ...]) -> Array:
    if x.shape != tuple(shape):
        raise ValueError(f"{name} has shape {x.shape}, expected {tuple(shape)}")
    return x


def check_broadcastable(name: str, x: Array, shape: tuple[int, ...]) -> Array:
    """Checks that ``x`` broadcasts to ``shape`` without changing it."""
    try:
        # jnp's, unlike NumPy's, takes jax.export's symbolic dimensions.
        result = jnp.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        result = None
    if result != tuple(shape):
        raise ValueError(f"{name} has shape {x.shape}, which does not broadcast to {tuple(shape)}")
    return x


def check_unit_interval(name: str, x) -> Array:
    """``x`` as an array of real numbers (:func:`as_real`), each in [0, 1] where
    known at trace time. The value is read as given: under jit jnp's copy of a
    Python number is traced."""
    array = as_real(name, x)
    known = concrete_or_none(x)
    if known is not None and not np.all((known >= 0) & (known <= 1)):  # NaN fails too
        raise ValueError(f"{name} must lie in [0, 1], got {known.tolist()}")
    return array


def check_count(name: str, value, *, numpy: bool = True) -> int:
    """``value`` as an int >= 1: a Python int, or a NumPy integer too unless
    ``numpy=False``; bool is not taken. A ValueError naming ``name`` otherwise."""
    kinds = (int, np.integer) if numpy else int
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_positive(name: str, x) -> None:
    """Checks a scalar setting that may be traced: its rank always, its sign where known."""
    if x is None or isinstance(x, bool) or np.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar > 0, got {x!r}")
    as_real(name, x)
    known = concrete_or_none(x)
    if known is not None and not known > 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")


def check_key(name: str, key) -> Array:
    """``key`` as one PRNG key: a ``jax.random.key`` or a legacy uint32 ``PRNGKey``."""
    try:
        key = jnp.asarray(key)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a PRNG key, got {type(key).__name__}") from err
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be one PRNG key, got an array of keys {key.shape}")
    elif key.dtype != jnp.uint32 or key.ndim != 1:
        raise ValueError(
            f"{name} must be a PRNG key (jax.random.key(seed)), got a {key.dtype} array "
            f"of shape {key.shape}"
        )
    return key


def config_value(name: str, value, kind):
    """``value`` as a config field annotated ``kind``: an int, a float (an int is
    taken, NaN and inf are not), a bool, a str, a tuple of floats (from a list
    too), or one of these or None. Other values raise a ValueError naming ``name``."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    if type(None) in options:
        if value is None:
            return None
        (kind,) = [option for option in options if option is not type(None)]

    def number(x) -> bool:
        return isinstance(x, (numbers.Real)) and not isinstance(x, bool) and math.isfinite(x)

    if kind is float and number(value):
        return float(value)
    if kind == tuple[float, ...] and isinstance(value, (list, tuple)) and all(map(number, value)):
        return tuple(float(x) for x in value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind in (bool, str) and isinstance(value, kind):
        return value
    wanted = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
    wanted = wanted.get(kind, "a list of finite numbers") + (" or None" if options else "")
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def check_config(config) -> None:
    """Checks the fields of a dataclass config that :func:`config_value` knows; a
    tuple field must be a tuple (configs are hashed as static arguments of jit)."""
    for name, kind in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        simple = kind in (int, float, bool, str) or kind == tuple[float, ...]
        if not (simple or isinstance(kind, types.UnionType)):
            continue
        config_value(name, value, kind)
        if kind == tuple[float, ...] and not isinstance(value, tuple):
            raise ValueError(f"{name} must be a tuple of numbers, got {value!r}")


def concrete_or_none(x) -> np.ndarray | None:
    """The value of ``x`` as NumPy if it is known at trace time, else None."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (
        jax.errors.TracerArrayConversionError,
        jax.errors.ConcretizationTypeError,
        TypeError,
        ValueError,  # not numbers: the caller's own checks name them
    ):
        return None
