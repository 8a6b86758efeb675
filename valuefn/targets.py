"""Targets for value learning: TD(0), n-step, lambda-returns and GAE.

Every kernel takes time-last arrays ``[..., T]`` with any number of leading
batch axes (none included) and returns float32 ``[..., T]``:

- ``values[..., t] = V(s_t)``; ``bootstrap_value[...] = V(s_T)``, the value after
  the last step. Its value does not matter where the last valid step ends the
  episode or is cut, but it must be finite there too: the recursions multiply
  it by that step's discount of 0, and 0 * NaN is NaN. (Replacing it there
  would cost the kernels an extra pass over the mask.)
- ``discounts[..., t] = gamma_t``, broadcastable to ``[..., T]``: gamma where the
  episode goes on after step t, 0 where ``s_{t+1}`` is terminal.
- ``mask[..., t]`` (optional): 1 for real steps. A masked step is skipped as if
  absent: its outputs are 0, its reward, discount, truncation flag and value
  are ignored, and the recursion runs from the previous valid step straight to
  the next valid one.
- ``truncated[..., t]`` (optional, with ``final_values``): the episode was cut by
  a time limit after step t. The target bootstraps from ``final_values[..., t]``
  and the recursion does not chain into step t + 1.

Targets carry no gradient unless ``stop_target_gradients=False``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from valuefn import _gae_maps, _pallas_gae
from valuefn._checks import (
    as_real,
    check_broadcastable,
    check_count,
    check_shape,
    check_unit_interval,
)
from valuefn._pallas_scan import reverse_linear_pallas

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Method = Literal["auto", "scan", "associative", "pallas"]

METHODS = ("auto", "scan", "associative", "pallas")

# Below this horizon the sequential scan wins on every backend we measured; see
# benchmarks/bench_targets.py and benchmarks/RESULTS.md.
_ASSOCIATIVE_MIN_T = 256


class _Steps(NamedTuple):
    """Inputs aligned to ``[..., T]`` float32, with masks and truncation resolved."""

    rewards: Array  # [..., T]
    values: Array  # [..., T]
    discounts: Array  # [..., T], 0 on masked steps
    gamma: Array  # discounts as given, float32, broadcastable to [..., T], not masked
    valid: Array  # [..., T] bool
    masked: bool  # a mask was given that may skip steps (not known to keep one run)
    next_values: Array | None  # [..., T] V after step t: final value, next valid value or bootstrap
    chain: Array  # [..., T] discount into the next valid step's return, 0 at truncation
    next_index: Array | None  # [..., T] int32 index of the next valid step (T if none)
    bootstrap_value: Array  # [...]
    cut: Array | None  # [..., T] bool, valid steps cut by a time limit
    final_values: Array | None  # [..., T] read where cut


def discounts(gamma: ArrayLike, terminated: ArrayLike) -> Array:
    """Per-step discounts ``gamma_t = gamma * (1 - terminated_t)``.

    Args:
      gamma: discount factor in [0, 1], a scalar or broadcastable to ``terminated``;
        checked where known at trace time.
      terminated: ``[..., T]`` bool or 0/1; true where ``s_{t+1}`` is terminal.

    Returns:
      float32 ``[..., T]`` discounts.
    """
    terminated = as_real("terminated", terminated, allow_bool=True)
    gamma = check_broadcastable("gamma", check_unit_interval("gamma", gamma), terminated.shape)
    return jnp.where(terminated != 0, 0.0, gamma.astype(jnp.float32)).astype(jnp.float32)


class _Checked(NamedTuple):
    """The inputs as given, checked: float32 where they are real values."""

    rewards: Array  # [..., T]
    values: Array  # [..., T]
    discounts: Array  # broadcastable to [..., T]
    bootstrap_value: Array  # [...]
    mask: Array | None  # broadcastable to [..., T], as given (bool or numbers)
    truncated: Array | None  # broadcastable to [..., T], as given
    final_values: Array | None  # broadcastable to [..., T], with truncated


def _check(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    mask: ArrayLike | None,
    truncated: ArrayLike | None,
    final_values: ArrayLike | None,
) -> _Checked:
    """Checks the inputs' shapes and dtypes, raising ValueErrors that name them."""
    rewards = as_real("rewards", rewards)
    if rewards.ndim < 1 or rewards.shape[-1] < 1:
        raise ValueError(
            f"rewards must have a time axis last, shape [..., T] with T >= 1; "
            f"got shape {rewards.shape}"
        )
    shape = rewards.shape
    values = check_shape("values", as_real("values", values), shape)
    bootstrap_value = check_shape(
        "bootstrap_value", as_real("bootstrap_value", bootstrap_value), shape[:-1]
    )
    discounts = check_broadcastable("discounts", as_real("discounts", discounts), shape)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    if mask is not None:
        mask = check_broadcastable("mask", as_real("mask", mask, allow_bool=True), shape)
    if truncated is not None:
        if final_values is None:
            raise ValueError("truncated needs final_values: V(final observation) at each cut")
        truncated = check_broadcastable(
            "truncated", as_real("truncated", truncated, allow_bool=True), shape
        )
        final_values = f32(
            check_broadcastable("final_values", as_real("final_values", final_values), shape)
        )
        # Zeroed where not read: junk there would send NaN gradients (0 * NaN) back.
        read = truncated != 0 if mask is None else (truncated != 0) & (mask != 0)
        final_values = jnp.where(read, final_values, 0.0)
    elif final_values is not None:
        raise ValueError(
            "final_values is read at truncations only: pass truncated with it (or neither)"
        )
    return _Checked(
        f32(rewards),
        f32(values),
        f32(discounts),
        f32(bootstrap_value),
        mask,
        truncated,
        final_values,
    )


def _prepare(
    checked: _Checked,
    *,
    resolve_next: bool = True,
    next_by: str | None = None,
    one_run: bool = False,
) -> _Steps:
    """Aligns the checked inputs.

    With a mask and ``resolve_next=False`` the next valid step is not looked up:
    ``next_values`` and ``next_index`` are None, and the caller carries the next
    valid value itself (``_masked_gae_scan``) or needs none
    (``_masked_gae_by_returns``). With
    ``next_by``, a method, the next valid value comes from a reverse linear
    recursion solved by that method and ``next_index`` is None. With ``one_run``
    the caller has checked that the valid steps of each row are one run of
    steps (:func:`_keeps_one_run`): the next valid step is the next step or none.
    """
    rewards, values, gamma, bootstrap_value, _, _, final_values = checked
    shape = rewards.shape
    masked, truncated = checked.mask is not None, checked.truncated is not None
    valid = jnp.broadcast_to(checked.mask != 0, shape) if masked else None
    if truncated:
        cut = jnp.broadcast_to(checked.truncated != 0, shape)
    gammas = jnp.broadcast_to(gamma, shape)
    next_index = next_values = None
    if valid is None:
        next_values = _at_next(values, bootstrap_value, None)
    elif one_run:
        next_values = _at_next_in_run(values, valid, bootstrap_value)
        masked = False
    elif resolve_next and next_by is not None:
        next_values = _next_valid_values(values, bootstrap_value, valid, next_by)
    elif resolve_next:
        steps = jnp.arange(shape[-1], dtype=jnp.int32)
        index = jnp.where(valid, steps, shape[-1])
        suffix_min = jax.lax.cummin(index, axis=index.ndim - 1, reverse=True)
        next_index = jnp.concatenate(
            [suffix_min[..., 1:], jnp.full(shape[:-1] + (1,), shape[-1], jnp.int32)], axis=-1
        )
        next_values = _at_next(values, bootstrap_value, next_index)
    if valid is not None:
        rewards = jnp.where(valid, rewards, 0.0)
        values = jnp.where(valid, values, 0.0)
        gammas = jnp.where(valid, gammas, 0.0)
    chain = gammas
    cut_values = None
    if truncated:
        if valid is not None:
            cut = cut & valid
        cut_values = jnp.broadcast_to(final_values, shape)
        if next_values is not None:
            next_values = jnp.where(cut, cut_values, next_values)
        chain = jnp.where(cut, 0.0, gammas)
    else:
        cut = None
    if valid is None:
        valid = jnp.ones(shape, bool)
    return _Steps(
        rewards,
        values,
        gammas,
        gamma,
        valid,
        masked,
        next_values,
        chain,
        next_index,
        bootstrap_value,
        cut,
        cut_values,
    )


@jax.custom_batching.custom_vmap
def _keeps_one_run(valid: Array) -> Array:
    """Whether the valid steps of each row of ``valid`` (bool ``[..., T]``) are one
    run of steps or none, as in a right-padded, left-padded or prompt-then-response
    batch: a scalar bool."""
    valid = jnp.atleast_1d(valid)
    return jnp.all(jnp.sum(_run_starts(valid), axis=-1) <= 1)


@_keeps_one_run.def_vmap
def _keeps_one_run_vmap(axis_size, in_batched, valid):
    # One answer for the whole batch, so that a ``lax.cond`` on it stays a branch
    # under ``jax.vmap`` instead of computing both sides.
    return _keeps_one_run(valid), False


def _run_starts(valid: Array) -> Array:
    """Where a run of valid steps starts: ``valid`` (bool ``[..., T]``) and the
    step before it not."""
    before = jnp.concatenate([jnp.zeros_like(valid[..., :1]), valid[..., :-1]], axis=-1)
    return valid & ~before


def _by_mask_layout(checked: _Checked, solve: Callable[[bool], Any]) -> Any:
    """``solve(one_run)``, with ``one_run`` whether the valid steps of each row
    are one run of steps, so that a padded mask needs no search for the next
    valid step; a ``lax.cond`` picks the branch at run time."""
    if checked.mask is None:
        return solve(False)
    one_run = _keeps_one_run(checked.mask != 0)
    return jax.lax.cond(one_run, functools.partial(solve, True), functools.partial(solve, False))


def _at_next(x: Array, last: Array, next_index: Array | None) -> Array:
    """``x`` at the step after each t along the last axis, ``last[...]`` past the end.

    Without a mask (``next_index`` None) that is ``x[..., t + 1]``; with one, ``x``
    at ``next_index``, the next valid step.
    """
    if next_index is None:
        return _shift_left(x, last)
    extended = jnp.concatenate([x, last[..., None]], axis=-1)
    return jnp.take_along_axis(extended, next_index, axis=-1)


def _at_next_in_run(x: Array, valid: Array, last: Array) -> Array:
    """``x`` at the next valid step where the valid steps of each row are one run:
    the next step, or ``last[...]`` after the last valid one. (What the masked
    steps before the run get does not matter: no valid step reads them.)"""
    return _shift_left(jnp.where(valid, x, last[..., None]), last)


def _next_valid_values(values: Array, bootstrap_value: Array, valid: Array, method: str) -> Array:
    """``values`` at the next valid step after each t, ``bootstrap_value`` past the
    last: ``y[t + 1]`` for ``y_t = V_t`` on valid steps and ``y_{t+1}`` on masked
    ones, ``y_T = bootstrap_value``, a reverse linear recursion."""
    coeffs = jnp.where(valid, 0.0, 1.0)
    return _next_of_recursion(method, jnp.where(valid, values, 0.0), coeffs, bootstrap_value)


def _next_of_recursion(
    method: str,
    deltas: Array,
    coeffs: Array,
    last: Array,
    read: Callable[..., Array] = lambda x: x,
    extra: tuple[Array, ...] = (),
) -> Array:
    """``read(*extra at t, x_{t+1})`` along the last axis, where
    ``x_t = deltas_t + coeffs_t x_{t+1}`` and ``x_T = last[...]``, solved by
    ``method``; ``extra`` are ``[..., T]`` arrays.

    The blocked scan reads ``x_{t+1}`` in its walk, as the state entering step t;
    the other solvers solve from 0 with ``last`` entered at the last step, and
    the solution is shifted by one step.
    """
    if method == "scan":

        def walk(inputs, x):
            delta, coeff, *at_t = inputs
            return _apply_linear((delta, coeff), x), read(*at_t, x)

        return _reverse_blocked_scan(
            (deltas, coeffs, *extra),
            lambda delta, coeff, *_: (delta, coeff),
            _compose_linear,
            _apply_linear,
            walk,
            last,
            deltas.shape,
            _SCAN_BLOCK,
        )
    at_end = jnp.arange(deltas.shape[-1]) == deltas.shape[-1] - 1
    deltas = deltas + jnp.where(at_end, coeffs * last[..., None], 0.0)
    return read(*extra, _shift_left(_SOLVERS[method](deltas, coeffs), last))


def _shift_left(x: Array, last: Array) -> Array:
    """``x[..., t + 1]`` along the last axis, ``last[...]`` at the end."""
    return _shifted(x, 1, last[..., None])


def _shifted(x: Array, k: int, fill: ArrayLike) -> Array:
    """``x[..., t + k]`` along the last axis, ``fill`` past the end.

    A pad, which XLA fuses into the arithmetic that reads it; a concatenate is
    copied out first, a pass over the array that costs about 10% of a GAE call.
    """
    if k == 0:
        return x
    widths = [(0, 0, 0)] * (x.ndim - 1) + [(-k, k, 0)]
    shifted = jax.lax.pad(x, jnp.zeros((), x.dtype), widths)
    return jnp.where(jnp.arange(x.shape[-1]) >= x.shape[-1] - k, fill, shifted)


def _check_lambda(lambda_: ArrayLike, shape: tuple[int, ...]) -> Array:
    lam = check_broadcastable("lambda_", check_unit_interval("lambda_", lambda_), shape)
    return jnp.asarray(lam, jnp.float32)


def _resolve_method(method: str, horizon: int) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if jax.default_backend() == "cpu" or horizon < _ASSOCIATIVE_MIN_T:
        return "scan"
    return "associative"


# Steps composed into one map per block before the sequential scan (see
# ``_reverse_blocked_scan``), fastest on XLA:CPU among 2 to 16 at 256 x 4096:
# 8 for GAE without a mask, 4 with one, whose maps carry more coefficients.
_SCAN_BLOCK = 8
_MASKED_SCAN_BLOCK = 4


def _compose_linear(
    earlier: tuple[Array, Array], later: tuple[Array, Array]
) -> tuple[Array, Array]:
    """``x -> delta + coeff * x`` maps as ``(delta, coeff)``: ``later``, then ``earlier``."""
    return earlier[0] + earlier[1] * later[0], earlier[1] * later[1]


def _reverse_blocked_scan(
    inputs: tuple[Array, ...],
    step: Callable[..., tuple[Array, ...]],
    compose: Callable[[tuple[Array, ...], tuple[Array, ...]], tuple[Array, ...]],
    apply: Callable[[tuple[Array, ...], Any], Any],
    walk: Callable[[tuple[Array, ...], Any], tuple[Any, Array]],
    init: Any,
    shape: tuple[int, ...],
    block: int,
) -> Array:
    """Walks ``state_t, out_t = walk(inputs at t, state_{t+1})`` back from ``state_T = init``.

    Each input is ``[..., T]`` (``shape``) or ``[...]`` when constant in time.
    The same step as a map: ``step(*inputs at t)``, which ``apply(map, state)``
    applies and ``compose(earlier, later)`` composes into the map that applies
    ``later``, then ``earlier``. Returns ``out`` as ``[..., T]``.

    The maps of each block of ``block`` steps are composed into one in passes
    over the batch-major arrays, a ``lax.scan`` over the ``T / block`` block
    maps finds the state entering each block, and ``walk`` fills in the blocks
    from it in passes over the batch-major arrays again. On XLA:CPU each step of
    a scan costs a handful of kernel launches whatever its width, and each array
    moved time-major costs a pass at a fraction of the memory bandwidth; a scan
    over block maps pays both on ``1 / block`` of the data. The maps are built
    from the inputs block position by block position, so that XLA computes them
    where they are read instead of writing them out.
    """
    horizon = shape[-1]
    pad = -horizon % block
    blocks = (horizon + pad) // block
    widths = [(0, 0)] * (len(shape) - 1) + [(pad, 0)]
    # Padding steps before t = 0 only reach outputs and states before it.
    inputs = tuple(
        jnp.pad(x, widths).reshape(shape[:-1] + (blocks, block))
        if x.shape == shape
        else x[..., None, None]
        for x in inputs
    )

    def inputs_at(k):
        return tuple(x[..., min(k, x.shape[-1] - 1)] for x in inputs)

    whole = step(*inputs_at(block - 1))
    for k in range(block - 2, -1, -1):
        whole = compose(step(*inputs_at(k)), whole)
    # Block maps that do not vary along time stay out of the scanned inputs.
    xs = [jnp.moveaxis(m, -1, 0) for m in whole if m.shape[-1] > 1]

    def body(state, x):
        x = iter(x)
        state = apply(tuple(next(x) if m.shape[-1] > 1 else m[..., 0] for m in whole), state)
        return state, state

    _, starts = jax.lax.scan(body, init, xs, length=blocks, reverse=True)
    # The state entering each block from the right is the next block's start.
    state = jax.tree.map(
        lambda s, i: jnp.concatenate([jnp.moveaxis(s, 0, -1)[..., 1:], i[..., None]], axis=-1),
        starts,
        init,
    )
    outs = [None] * block
    for k in range(block - 1, -1, -1):
        state, outs[k] = walk(inputs_at(k), state)
    out = jnp.moveaxis(jnp.stack(outs), 0, -1).reshape(shape[:-1] + (blocks * block,))
    return out[..., pad:]


def _apply_linear(step: tuple[Array, Array], x: Array) -> Array:
    """The map ``x -> delta + coeff * x`` of ``step = (delta, coeff)``, applied."""
    return step[0] + step[1] * x


def _reverse_linear_scan(deltas: Array, coeffs: Array) -> Array:
    """Solves ``x_t = deltas_t + coeffs_t * x_{t+1}``, ``x_T = 0``, by a blocked scan.

    ``coeffs`` is ``[..., T]`` like ``deltas``, or ``[...]`` when it does not vary
    along time: then the block maps share one coefficient, ``coeffs ** block``,
    which stays out of the scanned inputs.
    """

    def walk(step, x):
        x = _apply_linear(step, x)
        return x, x

    init = jnp.zeros(deltas.shape[:-1], deltas.dtype)
    return _reverse_blocked_scan(
        (deltas, coeffs),
        lambda *m: m,
        _compose_linear,
        _apply_linear,
        walk,
        init,
        deltas.shape,
        _SCAN_BLOCK,
    )


def _reverse_linear_associative(deltas: Array, coeffs: Array) -> Array:
    """Same recursion as ``_reverse_linear_scan`` by a parallel prefix scan.

    Each step is the affine map ``x -> delta + coeff * x``; the suffix composition
    of the maps from t to T - 1 applied to ``x_T = 0`` is ``x_t``.
    """
    out, _ = jax.lax.associative_scan(
        lambda later, earlier: _compose_linear(earlier, later),
        (deltas, coeffs),
        reverse=True,
        axis=deltas.ndim - 1,
    )
    return out


@jax.custom_jvp
def _reverse_linear_pallas(deltas: Array, coeffs: Array) -> Array:
    """``reverse_linear_pallas`` with ``coeffs`` as ``[..., T]``, differentiable.

    Pallas kernels have no derivative rules, so the derivative, ``x' = d' + c' x_next
    + c x'_next``, is the same recursion solved by ``lax.associative_scan``,
    which JAX also transposes for reverse mode.
    """
    return reverse_linear_pallas(deltas, coeffs)


@_reverse_linear_pallas.defjvp
def _reverse_linear_pallas_jvp(primals, tangents):
    deltas, coeffs = primals
    deltas_dot, coeffs_dot = tangents
    x = _reverse_linear_pallas(deltas, coeffs)
    x_next = _shift_left(x, jnp.zeros(x.shape[:-1], x.dtype))
    return x, _reverse_linear_associative(deltas_dot + coeffs_dot * x_next, coeffs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _gae_pallas(
    chunk, rows, rewards, values, discounts, bootstrap_value, lam, final_values, mask, truncated
):
    """``_pallas_gae.gae_pallas`` in chunks of ``chunk`` steps and blocks of
    ``rows`` rows, differentiable: the derivative is that of
    ``gae(method="associative")``, which JAX also transposes for reverse mode."""
    return _pallas_gae.gae_pallas(
        rewards,
        values,
        discounts,
        bootstrap_value,
        lam,
        mask,
        truncated,
        final_values,
        chunk=chunk,
        rows=rows,
    )


@_gae_pallas.defjvp
def _gae_pallas_jvp(chunk, rows, primals, tangents):
    *differentiable, mask, truncated = primals

    def reference(rewards, values, discounts, bootstrap_value, lam, final_values):
        return gae(
            rewards,
            values,
            discounts,
            bootstrap_value,
            lam,
            mask=mask,
            truncated=truncated,
            final_values=final_values,
            stop_target_gradients=False,
            method="associative",
        )

    _, out_dot = jax.jvp(reference, tuple(differentiable), tuple(tangents[:-2]))
    return _gae_pallas(chunk, rows, *primals), out_dot


def _constant_in_time(x: Array, shape: tuple[int, ...]) -> Array | None:
    """``x`` (broadcastable to ``shape = [..., T]``) as a ``[...]`` array when it
    does not vary along time, else None."""
    if x.ndim and x.shape[-1] != 1:
        return None
    return jnp.broadcast_to(x[..., 0] if x.ndim else x, shape[:-1])


def _with_final_values(steps: _Steps, gain: Array) -> Array:
    """``gain`` plus ``gamma_t * final_values[..., t]`` where a time limit cut step
    t: the final value enters a cut step through its reward, since the recursion
    does not chain past the cut."""
    if steps.cut is None:
        return gain
    return gain + jnp.where(steps.cut, steps.discounts * steps.final_values, 0.0)


def _masked_gae_scan(steps: _Steps, lam: Array) -> Array:
    """GAE under a mask by a blocked scan of the maps of :mod:`valuefn._gae_maps`,
    which also carry the value at the next valid step. This replaces the
    ``cummin`` and gather of the next valid index, which on XLA:CPU cost more
    than the recursion itself."""
    shape = steps.rewards.shape
    gain = _with_final_values(steps, steps.rewards - steps.values)  # 0 on masked steps
    lam_now = _constant_in_time(lam, shape)
    lam = jnp.broadcast_to(lam, shape) if lam_now is None else lam_now

    def walk(inputs, state):
        valid = inputs[0]
        advantage, state = _gae_maps.walk(*inputs, state)
        return state, jnp.where(valid, advantage, 0.0)

    # chain is 0 on masked steps and at truncations.
    inputs = (steps.valid, gain, steps.values, steps.chain, lam)
    init = (jnp.zeros(shape[:-1], jnp.float32), steps.bootstrap_value)
    return _reverse_blocked_scan(
        inputs,
        _gae_maps.step_map,
        _gae_maps.compose,
        _gae_maps.apply,
        walk,
        init,
        shape,
        _MASKED_SCAN_BLOCK,
    )


_SOLVERS = {
    "scan": _reverse_linear_scan,
    "associative": _reverse_linear_associative,
    "pallas": _reverse_linear_pallas,
}


def _advantages(steps: _Steps, lam: Array, method: str) -> Array:
    """GAE advantages with masked steps passed through (delta 0, coefficient 1)."""
    if steps.next_values is None:
        return _masked_gae_scan(steps, lam)
    deltas = steps.rewards + steps.discounts * steps.next_values - steps.values
    deltas = jnp.where(steps.valid, deltas, 0.0)
    coeffs = None
    if method == "scan" and not steps.masked and steps.cut is None:
        # No mask and no truncation: the coefficient is lambda * gamma.
        coeffs = _constant_in_time(lam * steps.gamma, deltas.shape)
    if coeffs is None:
        coeffs = jnp.where(steps.valid, lam * steps.chain, 1.0)
    return jnp.where(steps.valid, _SOLVERS[method](deltas, coeffs), 0.0)


def _masked_gae_by_returns(steps: _Steps, lam: Array, method: str) -> tuple[Array, Array]:
    """GAE under a mask, with ``lam`` (``[...]``) constant in time, by one linear
    recursion of two coefficients, as without a mask.

    The lambda-return of a valid step t, ``R_t = A_t + V_t``, is
    ``r_t + c_t ((1 - lambda) V_n + lambda R_n)`` with ``n`` the next valid step and
    ``c_t`` the discount into it (0 at a termination or truncation, where the final
    value enters through ``r_t``). The mixture ``G_t = (1 - lambda) V_t + lambda R_t``
    is passed back through masked steps:
    ``G_t = (1 - lambda) V_t + lambda r_t + lambda c_t G_{t+1}`` on a valid step,
    ``G_{t+1}`` on a masked one, and ``G_T`` is the bootstrap value. Then
    ``R_t = r_t + c_t G_{t+1}`` and ``A_t = R_t - V_t``. Neither the next valid value
    nor its index is needed, where the advantages' own recursion needs one of them
    (``_masked_gae_scan`` carries it through maps of five coefficients).
    """
    gain = _with_final_values(steps, steps.rewards)  # 0 on masked steps, like values and chain
    lam = lam[..., None]
    coeffs = jnp.where(steps.valid, lam * steps.chain, 1.0)
    deltas = (1.0 - lam) * steps.values + lam * gain
    returns = _next_of_recursion(
        method,
        deltas,
        coeffs,
        steps.bootstrap_value,
        lambda gain, chain, mixed_next: gain + chain * mixed_next,
        (gain, steps.chain),
    )
    returns = jnp.where(steps.valid, returns, 0.0)
    return jnp.where(steps.valid, returns - steps.values, 0.0), returns


def _finish(x: Array, stop_target_gradients: bool) -> Array:
    return jax.lax.stop_gradient(x) if stop_target_gradients else x


def td_targets(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
) -> Array:
    """One-step TD targets ``y_t = r_t + gamma_t * V(s_{t+1})``.

    ``V(s_{t+1})`` is the next valid step's value, ``bootstrap_value`` after the
    last valid step, or ``final_values[..., t]`` where ``truncated[..., t]``.

    Args:
      rewards: ``[..., T]`` rewards ``r_t``.
      values: ``[..., T]`` predictions ``V(s_t)``.
      discounts: broadcastable to ``[..., T]``; ``gamma_t``, 0 at termination.
      bootstrap_value: ``[...]``, ``V(s_T)``.
      mask: optional ``[..., T]``, 1 on real steps. A mask whose valid steps are
        one run in every row (a right-padded batch, the RLHF layout, or a
        left-padded one) is found at run time and takes a shorter path than
        one with gaps: its next valid step is the next step. Under
        ``jax.vmap`` the check answers for the whole batch.
      truncated: optional ``[..., T]``, 1 where a time limit cut the episode after t.
      final_values: ``[..., T]`` V of the final observation, read where truncated.
      stop_target_gradients: hold the targets constant (the semi-gradient TD rule).

    Returns:
      float32 ``[..., T]`` targets, 0 on masked steps.

    References:
      Sutton & Barto, Reinforcement Learning: An Introduction, 2nd ed., 2018, ch. 6.
    """
    checked = _check(rewards, values, discounts, bootstrap_value, mask, truncated, final_values)
    return _td_targets(checked, stop_target_gradients=stop_target_gradients)


# The kernels' work after the checks is jitted: called eagerly, each lax.scan of a
# fresh closure would be traced and compiled again at every call (tens of ms).
@functools.partial(jax.jit, static_argnames="stop_target_gradients")
def _td_targets(checked: _Checked, *, stop_target_gradients: bool) -> Array:
    def solve(one_run: bool) -> Array:
        # On the CPU the blocked scan finds the next valid values under a mask with
        # gaps faster than a cummin and a gather of their index.
        next_by_scan = jax.default_backend() == "cpu"
        steps = _prepare(checked, one_run=one_run, next_by="scan" if next_by_scan else None)
        return jnp.where(steps.valid, steps.rewards + steps.discounts * steps.next_values, 0.0)

    return _finish(_by_mask_layout(checked, solve), stop_target_gradients)


def td_errors(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
) -> Array:
    """TD errors ``delta_t = r_t + gamma_t * V(s_{t+1}) - V(s_t)``.

    Same arguments as :func:`td_targets`. The gradient flows into ``values[..., t]``
    through ``-V(s_t)`` only, unless ``stop_target_gradients=False``.

    Returns:
      float32 ``[..., T]`` TD errors, 0 on masked steps.
    """
    targets = td_targets(
        rewards,
        values,
        discounts,
        bootstrap_value,
        mask=mask,
        truncated=truncated,
        final_values=final_values,
        stop_target_gradients=stop_target_gradients,
    )
    values = jnp.asarray(values, jnp.float32)
    if mask is None:
        return targets - values
    return jnp.where(jnp.broadcast_to(jnp.asarray(mask) != 0, targets.shape), targets - values, 0.0)


def n_step_targets(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    n: int,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
) -> Array:
    """n-step bootstrapped returns.

    ``y_t = r_t + gamma_t r_{t+1} + ... + (prod_{k<n} gamma_{t+k}) V(s_{t+n})``,
    counting valid steps only. Near the end of the sequence the sum stops at
    ``bootstrap_value``; at a truncation it stops at ``final_values[..., t]``.
    With ``n >= T`` this is the full discounted return.

    Args:
      n: static horizon, a Python int >= 1.
      Other arguments as :func:`td_targets`.

    Returns:
      float32 ``[..., T]`` targets, 0 on masked steps.

    References:
      Sutton & Barto, Reinforcement Learning: An Introduction, 2nd ed., 2018, ch. 7.
    """
    n = check_count("n", n)
    checked = _check(rewards, values, discounts, bootstrap_value, mask, truncated, final_values)
    return _n_step_targets(checked, n=n, stop_target_gradients=stop_target_gradients)


@functools.partial(jax.jit, static_argnames=("n", "stop_target_gradients"))
def _n_step_targets(checked: _Checked, *, n: int, stop_target_gradients: bool) -> Array:
    horizon = checked.rewards.shape[-1]
    steps_summed = min(int(n), horizon)  # more steps than the sequence has add nothing
    one_pass = checked.truncated is None and steps_summed <= _N_STEP_IN_RUN
    if checked.mask is None and steps_summed <= _N_STEP_UNROLLED:
        return _finish(_n_step_unrolled(_prepare(checked), steps_summed), stop_target_gradients)
    if checked.mask is None and one_pass:
        targets = _n_step_in_run(checked, steps_summed, None, horizon)
        return _finish(targets, stop_target_gradients)

    def solve(one_run: bool) -> Array:
        if one_run and one_pass and steps_summed > 1:  # one step is one pass anyway
            start, length = _run_bounds(jnp.broadcast_to(checked.mask != 0, checked.rewards.shape))
            return _n_step_in_run(checked, steps_summed, start, length)
        steps = _prepare(checked, one_run=one_run)
        one_step = steps.rewards + steps.discounts * steps.next_values

        def body(_, returns):
            if one_run:
                next_returns = _at_next_in_run(returns, steps.valid, steps.bootstrap_value)
            else:
                next_returns = _at_next(returns, steps.bootstrap_value, steps.next_index)
            return one_step + steps.chain * (next_returns - steps.next_values)

        targets = jax.lax.fori_loop(0, steps_summed, body, steps.values)
        return jnp.where(steps.valid, targets, 0.0)

    return _finish(_by_mask_layout(checked, solve), stop_target_gradients)


# n-step targets are one pass over the arrays, on XLA:CPU faster than a loop of n
# passes (benchmarks/RESULTS.md, 2026-11-25 23:40):
# - without a mask, up to this n, by the shifted valid steps (_n_step_unrolled,
#   truncations too): 1.5x to 3x for n = 2 to 6; from n = 8 on slower;
_N_STEP_UNROLLED = 6
# - then, without truncations, without a mask or with one whose valid steps are
#   one run in each row, up to this n, by the runs' bounds (_n_step_in_run): 1.6x
#   to 3.4x without a mask for n = 8 to 64, 1.3x to 3.6x with a right-padded
#   one for n = 2 to 64; from about n = 120 on XLA splits the fused
#   expression, 6x to 9x slower than the loop.
_N_STEP_IN_RUN = 64


def _run_bounds(valid: Array) -> tuple[Array, Array]:
    """``(start, length)``, int32 ``[..., 1]``, of each row of ``valid`` (bool
    ``[..., T]``) whose valid steps are one run: ``start <= t < start + length``
    (``(0, 0)`` for a row without any). Both come from sums, in one reduction
    where T allows: on a CPU one reduction over ``[256, 4096]`` took about a
    third of the time of the n = 5 pass itself."""
    horizon = valid.shape[-1]
    t = jnp.arange(horizon, dtype=jnp.int32)
    first = _run_starts(valid)  # the run's first step: one per row, or none
    if horizon < 2**15:  # start in the high 16 bits of the sum, the length in the low
        packed = jnp.sum(
            jnp.where(first, t << 16, 0) + valid, axis=-1, dtype=jnp.int32, keepdims=True
        )
        return packed >> 16, packed & 0xFFFF
    start = jnp.sum(jnp.where(first, t, 0), axis=-1, dtype=jnp.int32, keepdims=True)
    return start, jnp.sum(valid, axis=-1, dtype=jnp.int32, keepdims=True)


def _n_step_in_run(checked: _Checked, n: int, start: Array | None, length: ArrayLike) -> Array:
    """n-step targets, no truncation, for rows whose valid steps are one run,
    ``start <= t < start + length`` (``[..., 1]``; without a mask ``start`` is
    None and ``length`` the horizon), as one expression of the inputs shifted
    by 0 to n steps, which XLA fuses into one pass.

    ``y_t = a_t + c_t y_{t+1}``, unrolled from ``V(s_{t+n})``: ``a_t`` is the
    reward, plus the discounted bootstrap value at a row's last valid step,
    and ``c_t`` the discount into the next step, 0 from the last valid step
    on, so that no sum reaches past it. Which steps those are follows from
    their position in the run, not from the mask read at every shift. Inputs
    outside the run are replaced by 0, so junk there changes nothing.
    """
    rewards, values, discounts, bootstrap_value = checked[:4]
    t = jnp.arange(rewards.shape[-1], dtype=jnp.int32)
    gammas = jnp.broadcast_to(discounts, rewards.shape)
    if start is None:
        position = t

        def inside(step, width):
            return step < width
    else:
        position = t - start  # negative before the run

        def inside(step, width):  # 0 <= step < width, in one unsigned comparison
            unsigned = jax.lax.bitcast_convert_type(step, jnp.uint32)
            return unsigned < jnp.maximum(width, 0).astype(jnp.uint32)

    targets = jnp.where(inside(position + n, length), _shifted(values, n, 0.0), 0.0)
    for k in reversed(range(n)):
        gamma, step = _shifted(gammas, k, 0.0), position + k
        gain = _shifted(rewards, k, 0.0) + jnp.where(
            step == length - 1, gamma * bootstrap_value[..., None], 0.0
        )
        chain = jnp.where(inside(step, length - 1), gamma, 0.0)
        targets = jnp.where(inside(step, length), gain, 0.0) + chain * targets
    return jnp.where(inside(position, length), targets, 0.0)


def _n_step_unrolled(steps: _Steps, n: int) -> Array:
    """n-step targets without a mask (truncations too) as one expression of the
    inputs shifted by 0 to n steps, which XLA fuses into one pass: ``y = a_t + c_t y_{t+1}``
    unrolled from ``V(s_{t+n})``, with ``a_t`` the reward (plus the discounted
    final value at a truncation), ``c_t`` the discount into the next step, and
    the bootstrap value from the end of the sequence on. (The steps still in
    the sequence are picked by the shifted mask of valid steps, all true here:
    XLA folds it, where an index comparison ran at half the speed.)"""
    last = steps.bootstrap_value[..., None]
    gain = steps.rewards + (steps.discounts - steps.chain) * steps.next_values
    targets = _shifted(steps.values, n, last)
    for k in reversed(range(n)):
        step = _shifted(gain, k, 0.0) + _shifted(steps.chain, k, 0.0) * targets
        targets = jnp.where(_shifted(steps.valid, k, False), step, last)
    return targets


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    lambda_: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> tuple[Array, Array]:
    """Generalised advantage estimation.

    ``A_t = delta_t + gamma_t * lambda * A_{t+1}`` with
    ``delta_t = r_t + gamma_t V(s_{t+1}) - V(s_t)``; the recursion stops at the end,
    at terminations (``gamma_t = 0``) and at truncations, and skips masked steps.

    Args:
      lambda_: in [0, 1], a scalar or broadcastable to ``[..., T]``; a value
        known at trace time is checked, a traced one (a schedule) is not.
      method: ``"scan"`` (a reverse ``lax.scan`` over the steps' affine maps
        ``A -> delta_t + c_t A`` composed in blocks of a few steps),
        ``"associative"`` (``lax.associative_scan`` over the same maps),
        ``"pallas"`` (Pallas kernels for NVIDIA GPUs that walk chunks of steps
        and join them by their composed maps, reading the inputs themselves
        where T is a multiple of their chunk; interpreted, slowly, on other
        backends) or ``"auto"`` (picked by backend and horizon: ``"scan"`` on a
        CPU and for short horizons, else ``"associative"``). All give the same
        numbers up to float rounding.
      Other arguments as :func:`td_targets` (``pallas``'s kernels that read the
        inputs take a right-padded mask and one with gaps alike).

    Returns:
      ``(advantages, returns)``, both float32 ``[..., T]`` and 0 on masked steps;
      ``returns = advantages + values`` are the lambda-returns.

    References:
      Schulman et al., High-Dimensional Continuous Control Using Generalized
      Advantage Estimation, 2016.
    """
    checked = _check(rewards, values, discounts, bootstrap_value, mask, truncated, final_values)
    shape = checked.rewards.shape
    method = _resolve_method(method, shape[-1])
    lam = _check_lambda(lambda_, shape)
    # Where it can, pallas reads the inputs in its own kernels (valuefn/_pallas_gae.py),
    # in chunks of steps and blocks of rows of the module's sizes (read here, so
    # that tests can set small ones).
    blocks = (_pallas_gae.CHUNK, _pallas_gae.ROWS)
    fused = method == "pallas" and _pallas_gae.block_rows(shape, chunk=blocks[0]) is not None
    return _gae(
        checked,
        lam,
        method=method,
        fused_blocks=blocks if fused else None,
        stop_target_gradients=stop_target_gradients,
    )


@functools.partial(jax.jit, static_argnames=("method", "fused_blocks", "stop_target_gradients"))
def _gae(
    checked: _Checked,
    lam: Array,
    *,
    method: str,
    fused_blocks: tuple[int, int] | None,
    stop_target_gradients: bool,
) -> tuple[Array, Array]:
    if fused_blocks is not None:
        advantages, returns = _gae_pallas(
            *fused_blocks,
            checked.rewards,
            checked.values,
            checked.discounts,
            checked.bootstrap_value,
            lam,
            checked.final_values,
            checked.mask,
            checked.truncated,
        )
    else:
        lam_now = _constant_in_time(lam, checked.rewards.shape)

        def solve(one_run: bool) -> tuple[Array, Array]:
            if checked.mask is not None and not one_run and lam_now is not None:
                # A mask with gaps: one recursion of the lambda-returns' mixture.
                return _masked_gae_by_returns(
                    _prepare(checked, resolve_next=False), lam_now, method
                )
            steps = _prepare(
                checked,
                resolve_next=method != "scan",
                # With a mask with gaps and lambda varying in time, pallas finds the next
                # valid values by its own kernels instead of an index lookup (a cummin
                # and a gather).
                next_by="pallas" if method == "pallas" else None,
                one_run=one_run,
            )
            advantages = _advantages(steps, lam, method)
            return advantages, advantages + steps.values  # both 0 on masked steps

        advantages, returns = _by_mask_layout(checked, solve)
    return _finish(advantages, stop_target_gradients), _finish(returns, stop_target_gradients)


def lambda_returns(
    rewards: ArrayLike,
    values: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    lambda_: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> Array:
    """lambda-returns ``G_t = r_t + gamma_t ((1 - lambda) V(s_{t+1}) + lambda G_{t+1})``.

    ``G`` after the last valid step is ``bootstrap_value``; at a truncation both
    ``V(s_{t+1})`` and ``G_{t+1}`` are ``final_values[..., t]``. lambda = 0 gives
    :func:`td_targets`, lambda = 1 gives :func:`discounted_returns`.

    Arguments as :func:`gae`.

    Returns:
      float32 ``[..., T]`` returns, 0 on masked steps.

    References:
      Sutton & Barto, Reinforcement Learning: An Introduction, 2nd ed., 2018, ch. 12.
    """
    _, returns = gae(
        rewards,
        values,
        discounts,
        bootstrap_value,
        lambda_,
        mask=mask,
        truncated=truncated,
        final_values=final_values,
        stop_target_gradients=stop_target_gradients,
        method=method,
    )
    return returns


def discounted_returns(
    rewards: ArrayLike,
    discounts: ArrayLike,
    bootstrap_value: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    truncated: ArrayLike | None = None,
    final_values: ArrayLike | None = None,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> Array:
    """Monte Carlo returns ``G_t = r_t + gamma_t G_{t+1}``, ``G_T = bootstrap_value``.

    At a truncation ``G_{t+1}`` is ``final_values[..., t]``. Arguments as
    :func:`gae` without ``values`` and ``lambda_`` (this is lambda = 1).

    Returns:
      float32 ``[..., T]`` returns, 0 on masked steps.
    """
    rewards = as_real("rewards", rewards)
    return lambda_returns(
        rewards,
        jnp.zeros(rewards.shape, jnp.float32),
        discounts,
        bootstrap_value,
        1.0,
        mask=mask,
        truncated=truncated,
        final_values=final_values,
        stop_target_gradients=stop_target_gradients,
        method=method,
    )
