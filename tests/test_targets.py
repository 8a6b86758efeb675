"""Target kernels against plain NumPy loop references, and their properties."""

from __future__ import annotations

import functools
import logging
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

import valuefn as vf
from valuefn import _pallas_gae
from valuefn._pallas_scan import reverse_linear_pallas
from valuefn.targets import _keeps_one_run

TOL = {"rtol": 1e-5, "atol": 1e-5}
# Few shapes: each new shape costs a compilation. Unbatched, batched, two batch
# axes, and a horizon of one.
SHAPES = ((7,), (3, 6), (2, 2, 4), (3, 1))
METHODS = ("scan", "associative", "auto", "pallas")


def one_run_per_row(horizon, starts, ends):
    """A mask ``[..., T]`` that keeps steps ``starts <= t < ends`` of each row
    (``starts`` and ``ends``: ``[...]``)."""
    steps = np.arange(horizon)
    return (steps >= np.asarray(starts)[..., None]) & (steps < np.asarray(ends)[..., None])


def make_episode(
    shape,
    seed,
    *,
    masked=True,
    truncations=True,
    per_step_discounts=True,
):
    """Random kernel inputs as a dict of keyword arguments (absent ones omitted).

    ``masked="prefix"`` gives a right-padded mask: each row keeps its first
    ``n`` steps, ``n`` drawn from 0 to T. ``masked="run"`` keeps one run of
    steps ``s <= t < e`` in each row, ``0 <= s <= e <= T`` drawn (left-padded,
    right-padded, both or neither).
    """
    rng = np.random.default_rng(seed)

    def normal(size):
        return rng.normal(size=size).astype(np.float32)

    gamma = float(rng.uniform(0.5, 1.0))
    inputs = {
        "rewards": normal(shape),
        "values": normal(shape),
        "bootstrap_value": normal(shape[:-1]),
        "discounts": gamma,
    }
    if per_step_discounts:
        gammas = rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
        inputs["discounts"] = np.where(rng.random(shape) < 0.2, 0.0, gammas).astype(np.float32)
    if masked == "prefix":
        lengths = rng.integers(0, shape[-1] + 1, size=shape[:-1])
        inputs["mask"] = np.arange(shape[-1]) < lengths[..., None]
    elif masked == "run":
        ends = rng.integers(0, shape[-1] + 1, size=shape[:-1])
        starts = rng.integers(0, ends + 1)
        inputs["mask"] = one_run_per_row(shape[-1], starts, ends)
    elif masked:
        inputs["mask"] = rng.random(shape) < rng.choice([0.3, 0.7, 1.0])
    if truncations:
        inputs["truncated"] = rng.random(shape) < 0.2
        inputs["final_values"] = normal(shape)
    return inputs


@st.composite
def episodes(draw):
    return make_episode(
        draw(st.sampled_from(SHAPES)),
        draw(st.integers(0, 2**32 - 1)),
        masked=draw(st.sampled_from([False, True, "prefix", "run"])),
        truncations=draw(st.booleans()),
        per_step_discounts=draw(st.booleans()),
    )


def split(inputs):
    """``(positional, keyword)`` arguments of a kernel taking values."""
    inputs = dict(inputs)
    positional = tuple(
        inputs.pop(name) for name in ("rewards", "values", "discounts", "bootstrap_value")
    )
    return positional, inputs


def call(kernel, inputs, *args, **kwargs):
    positional, options = split(inputs)
    return kernel(*positional, *args, **options, **kwargs)


def assert_gae_matches_reference(got, inputs, lambda_):
    """``got = (advantages, returns)`` against the references at ``lambda_``."""
    expected = call(ref.gae_advantages, inputs, lambda_), call(ref.lambda_returns, inputs, lambda_)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, **TOL)


def without_values(kernel):
    """Adapts ``discounted_returns`` to the argument order of the other kernels."""

    @functools.wraps(kernel)
    def adapted(rewards, values, discounts, bootstrap_value, **kwargs):
        del values
        return kernel(rewards, discounts, bootstrap_value, **kwargs)

    return adapted


def gae_part(index):
    def part(*args, **kwargs):
        return vf.gae(*args, **kwargs)[index]

    return part


# Every kernel as f(rewards, values, discounts, bootstrap_value, **options) -> [..., T],
# with the reference computing the same thing.
KERNELS = {
    "td_targets": (vf.td_targets, ref.td_targets),
    "td_errors": (vf.td_errors, ref.td_errors),
    "n_step_targets": (
        functools.partial(vf.n_step_targets, n=3),
        lambda *a, **k: ref.n_step_targets(*a, 3, **k),
    ),
    "lambda_returns": (
        functools.partial(vf.lambda_returns, lambda_=0.8),
        lambda *a, **k: ref.lambda_returns(*a, 0.8, **k),
    ),
    "gae_advantages": (
        functools.partial(gae_part(0), lambda_=0.8),
        lambda *a, **k: ref.gae_advantages(*a, 0.8, **k),
    ),
    "gae_returns": (
        functools.partial(gae_part(1), lambda_=0.8),
        lambda *a, **k: ref.lambda_returns(*a, 0.8, **k),
    ),
    "discounted_returns": (
        without_values(vf.discounted_returns),
        without_values(ref.discounted_returns),
    ),
}
KERNEL_NAMES = sorted(KERNELS)


# Every kernel equals its reference on random inputs.

GIVEN_LAMBDA_AND_METHOD = given(
    inputs=episodes(), lambda_=st.floats(0.0, 1.0), method=st.sampled_from(METHODS)
)


@given(inputs=episodes())
def test_td_targets_match_reference(inputs):
    np.testing.assert_allclose(call(vf.td_targets, inputs), call(ref.td_targets, inputs), **TOL)


def assert_derivatives_are_the_linear_map(targets, inputs, tangents, expected, *, seed):
    """``targets(*arrays)``, linear in the arrays named by ``tangents`` (a dict of
    directions), has ``expected`` as its derivative in those directions at
    ``inputs``, and its reverse mode is the transpose: ``<vjp(c), d> = <c, jvp(d)>``."""
    primals = tuple(inputs[key] for key in tangents)
    directions = tuple(tangents.values())
    _, derivative = jax.jvp(targets, primals, directions)
    np.testing.assert_allclose(derivative, expected, **TOL)
    cotangent = np.random.default_rng(seed).normal(size=np.shape(expected)).astype(np.float32)
    _, pullback = jax.vjp(targets, *primals)
    forward = np.sum(cotangent * np.asarray(derivative, np.float64))
    backward = sum(
        np.sum(np.asarray(g, np.float64) * d)
        for g, d in zip(pullback(cotangent), directions, strict=True)
    )
    np.testing.assert_allclose(backward, forward, rtol=1e-4)


# Either side of the n up to which n-step targets are one fused pass: by the runs'
# bounds without truncations (no mask, or valid steps in one run in each row), by
# the shifted valid steps with truncations and no mask; beyond, and under a mask
# with gaps, a loop of n passes.
N_STEP_EDGES = (
    1,
    2,
    vf.targets._N_STEP_UNROLLED,
    vf.targets._N_STEP_UNROLLED + 1,
    vf.targets._N_STEP_IN_RUN,
    vf.targets._N_STEP_IN_RUN + 1,
)


@pytest.mark.parametrize("n", N_STEP_EDGES)
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "one run"])
@pytest.mark.parametrize("truncations", [False, True], ids=["", "truncations"])
def test_n_step_targets_match_reference_on_either_side_of_one_pass(n, masked, truncations):
    """Jitted (a mask in one run is then found by a ``lax.cond``), with the
    sequence's end, the run's end and, where given, truncations inside the n
    steps. The mask's rows: right-padded (empty for small n), padded on both
    sides (runs shorter and longer than n), left-padded, full."""
    horizon = vf.targets._N_STEP_IN_RUN + 8
    inputs = make_episode((4, horizon), seed=n, masked=False, truncations=truncations)
    if masked:
        short, long = (0, 4) if n < 4 else (n - 1, n + 2)
        ends = [short, 1 + long, horizon, horizon]
        inputs["mask"] = one_run_per_row(horizon, starts=[0, 1, 3, 0], ends=ends)
    got = jax.jit(functools.partial(call, vf.n_step_targets, n=n))(inputs)
    np.testing.assert_allclose(got, call(ref.n_step_targets, inputs, n), **TOL)


@pytest.mark.parametrize("n", [3, 10])
def test_n_step_targets_in_one_pass_ignore_junk_outside_a_rows_run(n):
    """NaN on the masked steps of a mask in one run (rows right-padded, padded on
    both sides, left-padded, empty), which the one pass by the runs' bounds
    shifts into reach of every step: same targets, and finite gradients that
    are 0 there when the targets are not stopped."""
    horizon = n + 7
    clean = make_episode((4, horizon), seed=n, masked=False, truncations=False)
    valid = one_run_per_row(horizon, starts=[0, 2, 5, 0], ends=[1, n + 1, horizon, 0])
    clean["mask"] = valid
    junk = dict(clean)
    for key in ("rewards", "values", "discounts"):
        junk[key] = np.where(valid, clean[key], np.nan).astype(np.float32)
    kernel = jax.jit(functools.partial(call, vf.n_step_targets, n=n))
    np.testing.assert_allclose(kernel(junk), kernel(clean), **TOL)

    def total(values, rewards, discounts):
        inputs = {**junk, "values": values, "rewards": rewards, "discounts": discounts}
        return jnp.sum(call(vf.n_step_targets, inputs, n, stop_target_gradients=False))

    arrays = (junk["values"], junk["rewards"], junk["discounts"])
    for grad in jax.jit(jax.grad(total, argnums=(0, 1, 2)))(*arrays):
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)


@pytest.mark.parametrize(
    ("n", "masked"), [(3, "prefix"), (7, False), (7, "prefix"), (3, "run"), (7, "run")]
)
def test_n_step_targets_in_one_pass_differentiate_as_the_reference(n, masked):
    """Unstopped, the one pass by the runs' bounds is linear in rewards, values
    and the bootstrap value: forward mode is the reference applied to the
    direction, and reverse mode its transpose."""
    shape = (3, n + 5)
    inputs = make_episode(shape, seed=n, masked=masked, truncations=False)
    direction = make_episode(shape, seed=n + 10)
    keys = ("rewards", "values", "bootstrap_value")

    def targets(*arrays):
        changed = {**inputs, **dict(zip(keys, arrays, strict=True))}
        return call(vf.n_step_targets, changed, n, stop_target_gradients=False)

    tangents = {key: direction[key] for key in keys}
    expected = call(ref.n_step_targets, {**inputs, **tangents}, n)
    assert_derivatives_are_the_linear_map(targets, inputs, tangents, expected, seed=n)


@given(inputs=episodes())
def test_td_errors_match_reference(inputs):
    np.testing.assert_allclose(call(vf.td_errors, inputs), call(ref.td_errors, inputs), **TOL)


@given(inputs=episodes(), n=st.integers(1, 8))
def test_n_step_targets_match_reference(inputs, n):
    np.testing.assert_allclose(
        call(vf.n_step_targets, inputs, n), call(ref.n_step_targets, inputs, n), **TOL
    )


@GIVEN_LAMBDA_AND_METHOD
def test_lambda_returns_match_reference(inputs, lambda_, method):
    np.testing.assert_allclose(
        call(vf.lambda_returns, inputs, lambda_, method=method),
        call(ref.lambda_returns, inputs, lambda_),
        **TOL,
    )


@GIVEN_LAMBDA_AND_METHOD
def test_gae_matches_reference(inputs, lambda_, method):
    assert_gae_matches_reference(call(vf.gae, inputs, lambda_, method=method), inputs, lambda_)


@given(inputs=episodes(), method=st.sampled_from(METHODS))
def test_discounted_returns_match_reference(inputs, method):
    kernel, reference = KERNELS["discounted_returns"]
    np.testing.assert_allclose(call(kernel, inputs, method=method), call(reference, inputs), **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_per_step_lambda_weights_each_step_by_its_own_lambda(seed):
    inputs = make_episode((3, 6), seed)
    lambdas = np.random.default_rng(seed).uniform(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(
        call(vf.lambda_returns, inputs, lambdas), call(ref.lambda_returns, inputs, lambdas), **TOL
    )


# Identities between the kernels.


@pytest.fixture(params=SHAPES, ids=str)
def inputs(request):
    """Random inputs with masks and truncations, one set per test shape."""
    return make_episode(request.param, seed=SHAPES.index(request.param))


def test_lambda_zero_equals_td0(inputs):
    np.testing.assert_allclose(
        call(vf.lambda_returns, inputs, 0.0), call(vf.td_targets, inputs), **TOL
    )


def test_lambda_one_equals_discounted_returns(inputs):
    (rewards, values, discounts, bootstrap_value), options = split(inputs)
    np.testing.assert_allclose(
        vf.lambda_returns(rewards, values, discounts, bootstrap_value, 1.0, **options),
        vf.discounted_returns(rewards, discounts, bootstrap_value, **options),
        **TOL,
    )


def test_n_step_with_n_at_least_horizon_equals_lambda_one(inputs):
    horizon = inputs["rewards"].shape[-1]
    full_return = call(vf.lambda_returns, inputs, 1.0)
    for n in (horizon, horizon + 3):
        np.testing.assert_allclose(call(vf.n_step_targets, inputs, n), full_return, **TOL)


def test_one_step_target_equals_td0(inputs):
    np.testing.assert_allclose(
        call(vf.n_step_targets, inputs, 1), call(vf.td_targets, inputs), **TOL
    )


def test_gae_returns_equal_lambda_returns_and_advantages_plus_values(inputs):
    advantages, returns = call(vf.gae, inputs, 0.9)
    np.testing.assert_allclose(returns, call(vf.lambda_returns, inputs, 0.9), **TOL)
    valid = np.broadcast_to(inputs.get("mask", True), returns.shape)
    np.testing.assert_allclose(returns, np.where(valid, advantages + inputs["values"], 0.0), **TOL)


def test_gae_with_lambda_zero_gives_td_errors(inputs):
    advantages, _ = call(vf.gae, inputs, 0.0)
    np.testing.assert_allclose(advantages, call(vf.td_errors, inputs), **TOL)


@pytest.mark.parametrize("shape", [(5,), (4, 300)])
def test_methods_agree(shape):
    # 300 steps are five of the Pallas kernels' chunks: their maps are joined.
    inputs = make_episode(shape, seed=len(shape))
    scan, *others = (
        jax.jit(functools.partial(call, vf.gae, lambda_=0.95, method=method))(inputs)
        for method in METHODS
    )
    for other in others:
        np.testing.assert_allclose(other[0], scan[0], **TOL)
        np.testing.assert_allclose(other[1], scan[1], **TOL)


def linear_recursion_loop(deltas, coeffs):
    """``x_t = deltas_t + coeffs_t x_{t+1}``, ``x_T = 0``, one step at a time."""
    out = np.zeros_like(deltas)
    x = np.zeros(deltas.shape[:-1], deltas.dtype)
    for t in reversed(range(deltas.shape[-1])):
        x = deltas[..., t] + coeffs[..., t] * x
        out[..., t] = x
    return out


# Chunks of 4 steps and blocks of 8 columns, so that small arrays take every
# path: one chunk, part of one, chunk maps joined once (5, 16, 17 steps) and
# twice (70 steps: 18 chunks, 5 chunks of their maps), columns padded.
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (2, 5), (9, 16), (3, 17), (2, 3, 70)], ids=str)
def test_pallas_recursion_matches_loop(shape):
    rng = np.random.default_rng(len(shape) + shape[-1])
    deltas = rng.normal(size=shape).astype(np.float32)
    coeffs = rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
    coeffs[rng.random(shape) < 0.15] = 0.0  # terminations cut the chain
    solve = jax.jit(functools.partial(reverse_linear_pallas, chunk=4, rows=8))
    expected = linear_recursion_loop(deltas, coeffs)
    np.testing.assert_allclose(solve(deltas, coeffs), expected, **TOL)
    # A coefficient constant in time may come without the time axis.
    constant = coeffs[..., 0]
    np.testing.assert_allclose(
        solve(deltas, constant),
        linear_recursion_loop(deltas, np.broadcast_to(constant[..., None], shape)),
        **TOL,
    )


@pytest.mark.parametrize(
    ("backend", "rows", "call_target"),
    [("triton", 32, "__gpu$xla.gpu.triton"), ("mosaic_gpu", 128, "mosaic_gpu_v2")],
)
def test_pallas_kernels_lower_for_an_nvidia_gpu(backend, rows, call_target):
    # Lowered for CUDA from this machine: 300 steps take the kernel that
    # composes the chunk maps and the walk twice, over their maps and over the
    # steps.
    solve = jax.jit(
        functools.partial(reverse_linear_pallas, rows=rows, backend=backend, interpret=False)
    )
    x = jax.ShapeDtypeStruct((4, 300), jnp.float32)
    lowered = solve.trace(x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert lowered.count("custom_call @") == lowered.count(f"custom_call @{call_target}") == 3


def test_pallas_mosaic_gpu_backend_interprets_to_the_same_numbers():
    rng = np.random.default_rng(9)
    deltas, coeffs = (rng.uniform(size=(3, 70)).astype(np.float32) for _ in range(2))
    solve = functools.partial(reverse_linear_pallas, chunk=8, rows=128, backend="mosaic_gpu")
    np.testing.assert_allclose(solve(deltas, coeffs), linear_recursion_loop(deltas, coeffs), **TOL)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"backend": "cuda"}, "backend"),
        ({"backend": "mosaic_gpu", "rows": 32}, "rows"),
        ({"chunk": 1}, "chunk must be >= 2"),
        ({"rows": 0}, "rows >= 1"),
    ],
)
def test_pallas_options_are_checked(options, name):
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=name):
        reverse_linear_pallas(x, x, **options)
    if "backend" not in options:
        with pytest.raises(ValueError, match="chunk and rows must be >= 1"):
            _pallas_gae.gae_pallas(
                x,
                x,
                0.9,
                x[:, 0],
                0.9,
                chunk=options.get("chunk", 5) - 1,
                rows=options.get("rows", 1),
            )


@pytest.fixture
def small_fused_pallas(monkeypatch):
    """``gae(method="pallas")`` reads its inputs in its own kernels for a multiple
    of 4 steps: chunks of 4 steps, blocks of 2 rows (1 for an odd batch)."""
    monkeypatch.setattr(_pallas_gae, "CHUNK", 4)
    monkeypatch.setattr(_pallas_gae, "ROWS", 2)


def pallas_calls(fn, *args):
    """The Pallas kernels in ``fn``'s program and whether they are the fused GAE's."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return jaxpr.count("pallas_call["), "name=_gae_pallas" in jaxpr


DISCOUNTS = ("per step", "per row", "scalar")
# Every mix of discounts (per step, per row or scalar), mask and truncations at
# 4 x 12 (several chunks of 4 steps); at each other shape every kind of
# discounts once, each with another mix of mask and truncations. The other
# shapes: one chunk (4 steps), the chunks' maps walked over 7 chunks (28) and
# over 37 (148: two groups of 16 in a loop and 5 before); two batch axes, an
# odd batch in blocks of 1 row, no batch.
FUSED_CASES = [
    ((4, 12), masked, truncations, discounts)
    for masked in (False, True)
    for truncations in (False, True)
    for discounts in DISCOUNTS
] + [
    (shape, (i + k) % 2 == 0, (i + k) % 4 < 2, discounts)
    for i, shape in enumerate([(2, 4), (2, 2, 28), (2, 148), (3, 8), (8,)])
    for k, discounts in enumerate(DISCOUNTS)
]


@pytest.mark.parametrize("shape, masked, truncations, discounts", FUSED_CASES, ids=str)
def test_fused_pallas_gae_matches_reference(
    small_fused_pallas, shape, masked, truncations, discounts
):
    seed = shape[-1] + 2 * masked + 4 * truncations + len(discounts)
    inputs = make_episode(shape, seed, masked=masked, truncations=truncations)
    if discounts == "per row":
        inputs["discounts"] = inputs["discounts"][..., :1]
    elif discounts == "scalar":
        inputs["discounts"] = 0.9
    if masked:
        inputs["mask"] = np.random.default_rng(seed).random(shape) < 0.6
    calls, fused = pallas_calls(lambda: call(vf.gae, inputs, 0.8, method="pallas"))
    assert (calls, fused) == (3, True)
    advantages, returns = call(vf.gae, inputs, 0.8, method="pallas")
    broadcast = {**inputs, "discounts": np.broadcast_to(inputs["discounts"], shape)}
    for name, got in (("gae_advantages", advantages), ("gae_returns", returns)):
        np.testing.assert_allclose(got, call(KERNELS[name][1], broadcast), **TOL)


@pytest.mark.parametrize("lambdas", ["per row", "per step"])
def test_fused_pallas_gae_takes_any_flag_dtype_and_lambda_in_time(small_fused_pallas, lambdas):
    inputs = make_episode((4, 8), seed=3)
    size = (4, 1) if lambdas == "per row" else (4, 8)
    lam = np.random.default_rng(3).uniform(0.5, 1.0, size=size).astype(np.float32)
    for dtype in (bool, np.float32, np.int32):
        flags = {key: inputs[key].astype(dtype) for key in ("mask", "truncated")}
        case = {**inputs, **flags}
        assert pallas_calls(lambda c=case: call(vf.gae, c, lam, method="pallas"))[1]
        assert_gae_matches_reference(call(vf.gae, case, lam, method="pallas"), inputs, lam)


def test_fused_pallas_gae_only_where_it_applies(small_fused_pallas):
    # A horizon off the chunks takes the recursion's kernels after XLA's
    # passes, with the reference's numbers.
    inputs = make_episode((4, 6), seed=4)
    assert not pallas_calls(lambda: call(vf.gae, inputs, 0.8, method="pallas"))[1]
    assert_gae_matches_reference(call(vf.gae, inputs, 0.8, method="pallas"), inputs, 0.8)


def test_pallas_gae_of_an_empty_batch_is_empty(small_fused_pallas):
    x = np.zeros((0, 8), np.float32)
    assert _pallas_gae.block_rows(x.shape, chunk=4, rows=2) is None
    advantages, returns = vf.gae(x, x, 0.9, x[:, 0], 0.8, mask=x, method="pallas")
    assert advantages.shape == returns.shape == (0, 8)


def test_fused_pallas_gae_vmaps(small_fused_pallas):
    inputs = make_episode((3, 2, 8), seed=5, truncations=False)
    positional, options = split(inputs)

    def gae(rewards, values, discounts, bootstrap_value, mask):
        return vf.gae(rewards, values, discounts, bootstrap_value, 0.8, mask=mask, method="pallas")

    args = (*positional, options["mask"])
    assert pallas_calls(jax.vmap(gae), *args)[1]
    assert_gae_matches_reference(jax.vmap(gae)(*args), inputs, 0.8)


def test_fused_pallas_gae_differentiates(small_fused_pallas):
    # No gradient by default; unstopped, forward mode is the reference applied
    # to the direction (the targets are linear in rewards, values, the
    # bootstrap value and the final values) and reverse mode its transpose.
    inputs = make_episode((2, 12), seed=7)
    for grad in _grads(gae_part(0), {**inputs, "lambda_": 0.8}, method="pallas"):
        np.testing.assert_array_equal(grad, 0.0)
    direction = make_episode((2, 12), seed=17)
    keys = ("rewards", "values", "bootstrap_value", "final_values")

    def advantages(*arrays):
        changed = {**inputs, **dict(zip(keys, arrays, strict=True))}
        return call(vf.gae, changed, 0.8, method="pallas", stop_target_gradients=False)[0]

    primals = tuple(inputs[key] for key in keys)
    tangents = tuple(direction[key] for key in keys)
    _, derivative = jax.jvp(advantages, primals, tangents)
    expected = call(
        KERNELS["gae_advantages"][1], {**inputs, **dict(zip(keys, tangents, strict=True))}
    )
    np.testing.assert_allclose(derivative, expected, **TOL)
    cotangent = np.random.default_rng(7).normal(size=(2, 12)).astype(np.float32)
    _, pullback = jax.vjp(advantages, *primals)
    backward = sum(
        np.sum(np.asarray(g, np.float64) * t)
        for g, t in zip(pullback(cotangent), tangents, strict=True)
    )
    forward = np.sum(cotangent * np.asarray(derivative, np.float64))
    np.testing.assert_allclose(backward, forward, rtol=1e-4)


@pytest.mark.parametrize(("masked", "truncated"), [(False, False), (True, False), (True, True)])
def test_fused_pallas_gae_lowers_for_an_nvidia_gpu(masked, truncated):
    # At the default chunk and rows: three Triton kernels, whatever they read.
    shape = (64, 256)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    b = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    flags = jax.ShapeDtypeStruct(shape, jnp.bool_)
    gae = jax.jit(functools.partial(_pallas_gae.gae_pallas, interpret=False))
    optional = (flags if masked else None, flags if truncated else None, x if truncated else None)
    lowered = gae.trace(x, x, scalar, b, scalar, *optional).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    target = "__gpu$xla.gpu.triton"
    assert text.count("custom_call @") == text.count(f"custom_call @{target}") == 3


def test_horizon_one_is_one_step():
    inputs = make_episode((4, 1), seed=0, masked=False, truncations=False)
    expected = inputs["rewards"] + inputs["discounts"] * inputs["bootstrap_value"][:, None]
    for name in ("td_targets", "lambda_returns", "gae_returns"):
        np.testing.assert_allclose(call(KERNELS[name][0], inputs), expected, **TOL)


# Masks and truncation.


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_masked_junk_changes_nothing(name):
    kernel, _ = KERNELS[name]
    clean = make_episode((3, 6), seed=7)
    valid = clean["mask"]
    junk = dict(clean)
    for key in ("rewards", "values", "discounts", "final_values"):
        junk[key] = np.where(valid, clean[key], np.nan).astype(np.float32)
    junk["truncated"] = np.where(valid, clean["truncated"], True)
    # final_values is only read at truncations.
    junk["final_values"] = np.where(clean["truncated"], junk["final_values"], np.nan)
    out = call(kernel, junk)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(np.asarray(out)[~valid], 0.0)
    np.testing.assert_allclose(out, call(kernel, clean), **TOL)


def test_masked_junk_gives_finite_gradients_when_targets_are_not_stopped():
    clean = make_episode((3, 6), seed=8)
    valid = clean["mask"]
    junk = dict(clean)
    for key in ("rewards", "values", "discounts"):
        junk[key] = np.where(valid, clean[key], np.nan).astype(np.float32)
    for name in KERNEL_NAMES:
        kernel, _ = KERNELS[name]

        def total(values, rewards, kernel=kernel):
            inputs = {**junk, "values": values, "rewards": rewards}
            return jnp.sum(call(kernel, inputs, stop_target_gradients=False))

        for grad in jax.grad(total, argnums=(0, 1))(junk["values"], junk["rewards"]):
            assert np.all(np.isfinite(grad)), name
            np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)


@pytest.mark.parametrize("masked", [True, "run"])
def test_n_step_targets_under_a_mask_with_64_bit_types_enabled(masked):
    inputs = make_episode((3, 7), seed=12, masked=masked, truncations=False)
    with jax.enable_x64(True):
        got = call(vf.n_step_targets, inputs, 2)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, call(ref.n_step_targets, inputs, 2), **TOL)


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("masked", [False, True])
def test_final_values_where_no_step_is_cut_change_nothing(name, masked):
    """NaN or inf in final values where no valid step is cut changes neither the
    targets nor, with targets not stopped, their gradients."""
    kernel, _ = KERNELS[name]
    clean = make_episode((4, 6), seed=11, masked=masked)
    read = clean["truncated"] & clean.get("mask", True)
    junk = {**clean, "final_values": np.where(read, clean["final_values"], np.inf)}
    junk["final_values"][1::2] = np.where(read[1::2], clean["final_values"][1::2], np.nan)

    def total(inputs, rewards, values, discounts):
        changed = {**inputs, "rewards": rewards, "values": values, "discounts": discounts}
        return jnp.sum(call(kernel, changed, stop_target_gradients=False))

    arrays = (clean["rewards"], clean["values"], clean["discounts"])
    np.testing.assert_allclose(call(kernel, junk), call(kernel, clean), **TOL)
    for got, expected in zip(
        jax.grad(total, argnums=(1, 2, 3))(junk, *arrays),
        jax.grad(total, argnums=(1, 2, 3))(clean, *arrays),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("seed", range(2))
def test_masked_steps_are_absent(name, seed):
    """Valid outputs equal the kernel run on the sequence with masked steps removed."""
    kernel, _ = KERNELS[name]
    rng = np.random.default_rng(seed)
    inputs = make_episode((9,), seed)
    valid = np.zeros(9, bool)
    valid[rng.choice(9, size=5, replace=False)] = True
    inputs["mask"] = valid
    compact = {
        key: value[valid] if np.ndim(value) == 1 else value
        for key, value in inputs.items()
        if key != "mask"
    }
    out = np.asarray(call(kernel, inputs))
    np.testing.assert_allclose(out[valid], call(kernel, compact), **TOL)
    np.testing.assert_array_equal(out[~valid], 0.0)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_truncation_splits_the_sequence(name):
    """A cut after step t gives the targets of two separate episodes, the first
    bootstrapped from final_values[t]."""
    kernel, _ = KERNELS[name]
    inputs = make_episode((8,), seed=3, masked=False, truncations=False)
    cut = 4
    truncated = np.arange(8) == cut
    final_values = np.random.default_rng(0).normal(size=8).astype(np.float32)
    out = call(kernel, inputs, truncated=truncated, final_values=final_values)
    head = {key: value[: cut + 1] for key, value in inputs.items() if key != "bootstrap_value"}
    head["bootstrap_value"] = final_values[cut]
    tail = {key: value[cut + 1 :] for key, value in inputs.items() if key != "bootstrap_value"}
    tail["bootstrap_value"] = inputs["bootstrap_value"]
    np.testing.assert_allclose(out[: cut + 1], call(kernel, head), **TOL)
    np.testing.assert_allclose(out[cut + 1 :], call(kernel, tail), **TOL)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_absent_options_equal_neutral_ones(name):
    kernel, _ = KERNELS[name]
    plain = make_episode((3, 6), seed=4, masked=False, truncations=False)
    neutral = {
        **plain,
        "mask": np.ones((3, 6), np.float32),
        "truncated": np.zeros((3, 6), bool),
        "final_values": np.full((3, 6), 1e6, np.float32),
    }
    np.testing.assert_allclose(call(kernel, neutral), call(kernel, plain), **TOL)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bootstrap_value_is_ignored_after_termination(name):
    kernel, _ = KERNELS[name]
    inputs = make_episode((3, 6), seed=5, masked=False, truncations=False)
    inputs["discounts"][:, -1] = 0.0
    other = {**inputs, "bootstrap_value": inputs["bootstrap_value"] + 100.0}
    np.testing.assert_allclose(call(kernel, other), call(kernel, inputs), **TOL)


@pytest.mark.parametrize("truncations", [True, False])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_discounts_broadcast_like_full_arrays(name, truncations):
    kernel, _ = KERNELS[name]
    inputs = make_episode((3, 6), seed=6, per_step_discounts=False, truncations=truncations)
    rng = np.random.default_rng(6)
    for discounts in (
        rng.uniform(size=6).astype(np.float32),
        rng.uniform(size=(3, 1)).astype(np.float32),
        np.float32(0.9),
    ):
        full = np.broadcast_to(discounts, (3, 6))
        np.testing.assert_allclose(
            call(kernel, {**inputs, "discounts": discounts}),
            call(kernel, {**inputs, "discounts": full}),
            **TOL,
        )


@pytest.mark.parametrize("truncations", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_lambda_broadcasts_like_a_full_array(method, truncations):
    inputs = make_episode((3, 6), seed=7, truncations=truncations)
    rng = np.random.default_rng(7)
    for lambda_ in (rng.uniform(size=6), rng.uniform(size=(3, 1)), 0.7):
        lambda_ = np.float32(lambda_)
        full = np.broadcast_to(lambda_, (3, 6))
        got = call(vf.lambda_returns, inputs, lambda_, method=method)
        np.testing.assert_allclose(got, call(ref.lambda_returns, inputs, full), **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_gae_with_discount_and_lambda_constant_in_time_matches_reference(method):
    """Without a mask or truncations a time-constant ``lambda * gamma`` is kept out of
    the scanned inputs; per row or scalar, it must weigh every step alike."""
    inputs = make_episode((3, 7), seed=8, masked=False, truncations=False, per_step_discounts=False)
    rng = np.random.default_rng(8)
    for discounts in (np.float32(0.9), rng.uniform(0.5, 1.0, size=(3, 1)).astype(np.float32)):
        for lambda_ in (np.float32(0.7), rng.uniform(size=(3, 1)).astype(np.float32)):
            case = {**inputs, "discounts": discounts}
            full = {**inputs, "discounts": np.broadcast_to(discounts, (3, 7))}
            lam = np.broadcast_to(lambda_, (3, 7))
            assert_gae_matches_reference(call(vf.gae, case, lambda_, method=method), full, lam)


# Horizons across the scan's blocks of steps (valuefn.targets._SCAN_BLOCK = 8 without
# a mask, _MASKED_SCAN_BLOCK = 4 with one): one to sixteen blocks, whole or with a
# partial first one, in which the padding steps must reach nothing.
@pytest.mark.parametrize("shape", [(8,), (2, 9), (3, 21), (2, 64)])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"masked": False, "truncations": False},
        {"masked": False, "truncations": False, "per_step_discounts": False},
        {"truncations": False, "per_step_discounts": False},
    ],
    ids=["everything", "discounts", "plain", "mask"],
)
def test_gae_over_several_blocks_matches_reference(shape, options):
    kernel = jax.jit(functools.partial(call, vf.gae, method="scan"))
    rng = np.random.default_rng(len(options) + shape[-1])
    for seed in range(3):
        inputs = make_episode(shape, seed=seed, **options)
        for lambda_ in (np.float32(0.9), rng.uniform(size=shape).astype(np.float32)):
            lam = np.broadcast_to(lambda_, shape)
            assert_gae_matches_reference(kernel(inputs, lambda_=lambda_), inputs, lam)


# A mask whose valid steps are one run in each row (right-padded, left-padded or
# both) takes a shorter path, chosen at run time: the next valid step is the next
# step or none.


def test_keeps_one_run_answers_for_the_whole_batch():
    rng = np.random.default_rng(3)
    for _ in range(40):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 7)))
        valid = make_episode(shape, int(rng.integers(2**32)), masked="run")["mask"]
        row = valid[rng.integers(shape[0])]
        if rng.random() < 0.5 and shape[1] >= 3:  # two runs in one row
            first = rng.integers(shape[1] - 2)
            last = rng.integers(first + 2, shape[1])
            row[first:last] = False
            row[first] = row[last] = True
        elif rng.random() < 0.5:  # flip a step of one row
            row[rng.integers(shape[1])] ^= True
        runs = [
            sum(valid[b, t] and (t == 0 or not valid[b, t - 1]) for t in range(shape[1]))
            for b in range(shape[0])
        ]
        expected = max(runs) <= 1
        assert bool(_keeps_one_run(jnp.asarray(valid))) == expected
        # Under vmap too: one answer for all rows (broadcast to each by vmap).
        np.testing.assert_array_equal(jax.vmap(_keeps_one_run)(jnp.asarray(valid)), expected)


@pytest.mark.parametrize("horizon", [1, 9, 2**15 + 3], ids=["T=1", "T=9", "T=2**15+3"])
def test_run_bounds_are_the_first_valid_step_and_the_count(horizon):
    """The bounds of each row's one run, whether they are packed in one sum (T below
    2**15) or not, for empty rows, rows at either end and full ones."""
    rng = np.random.default_rng(horizon)
    valid = make_episode((40, horizon), seed=horizon, masked="run")["mask"]
    valid[:3] = [np.zeros(horizon, bool), np.ones(horizon, bool), np.arange(horizon) == 0]
    ends = rng.integers(horizon - 2, horizon + 1, size=5).clip(0)
    valid[3:8] = np.arange(horizon) >= ends[:, None]  # left-padded, at the end
    start, length = jax.jit(vf.targets._run_bounds)(jnp.asarray(valid))
    count = valid.sum(axis=-1)
    first = np.where(count > 0, np.argmax(valid, axis=-1), 0)
    np.testing.assert_array_equal(np.asarray(start)[:, 0], first)
    np.testing.assert_array_equal(np.asarray(length)[:, 0], count)


# Horizons over several of the scan's blocks, off the fused Pallas kernels' chunk.
@pytest.mark.parametrize("shape", [(5, 9), (2, 3, 21)], ids=str)
@pytest.mark.parametrize("truncations", [False, True])
@pytest.mark.parametrize("per_step_discounts", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_gae_with_a_mask_in_one_run_matches_reference(
    shape, truncations, per_step_discounts, method
):
    """A right-padded mask, then two whose runs start anywhere."""
    kernel = jax.jit(functools.partial(call, vf.gae, method=method))
    rng = np.random.default_rng(shape[-1])
    # A constant lambda * gamma (no truncations) is kept out of the scanned inputs.
    lambda_ = rng.uniform(size=shape).astype(np.float32) if per_step_discounts else 0.9
    lam = np.broadcast_to(np.float32(lambda_), shape)
    for seed, masked in enumerate(["prefix", "run", "run"]):
        inputs = make_episode(
            shape,
            seed=seed,
            masked=masked,
            truncations=truncations,
            per_step_discounts=per_step_discounts,
        )
        # Junk on the padding must change nothing.
        inputs["values"] = np.where(inputs["mask"], inputs["values"], np.float32(1e30))
        assert_gae_matches_reference(kernel(inputs, lambda_=lambda_), inputs, lam)


@pytest.mark.parametrize("masked", ["prefix", "run", True], ids=["right-padded", "one run", "gaps"])
@pytest.mark.parametrize("truncations", [False, True])
@pytest.mark.parametrize("name", ["td_targets", "td_errors", "n_step_targets"])
def test_td_and_n_step_targets_under_a_mask_match_reference(name, truncations, masked):
    """Jitted, over several of the blocked scan's blocks (which finds the next valid
    values under a mask with gaps on the CPU), with junk on the masked steps."""
    kernel, reference = KERNELS[name]
    jitted = jax.jit(functools.partial(call, kernel))
    for seed, shape in enumerate([(5, 9), (2, 3, 21), (2, 64)]):
        inputs = make_episode(shape, seed=seed, masked=masked, truncations=truncations)
        inputs["values"] = np.where(inputs["mask"], inputs["values"], np.float32(1e30))
        np.testing.assert_allclose(jitted(inputs), call(reference, inputs), **TOL)


@pytest.mark.parametrize("gap", [False, True])
def test_right_padding_check_stays_one_branch_under_vmap(gap):
    """vmapped over rows, GAE must still branch on one answer for all of them
    (a ``cond``, not a ``select`` of both sides), and give the reference numbers."""
    inputs = make_episode((4, 9), seed=5, masked="prefix")
    inputs["mask"][:, 0] = True
    if gap:
        inputs["mask"][2, 1:] = True
        inputs["mask"][2, 4] = False
    positional, options = split(inputs)
    keys = tuple(options)

    def row(rewards, values, discounts, bootstrap_value, *extra):
        options = dict(zip(keys, extra, strict=True))
        return vf.gae(rewards, values, discounts, bootstrap_value, 0.8, **options)

    mapped = jax.vmap(row)
    jaxpr = str(jax.make_jaxpr(mapped)(*positional, *options.values()))
    assert " cond[" in jaxpr
    lam = np.full((4, 9), 0.8, np.float32)
    assert_gae_matches_reference(mapped(*positional, *options.values()), inputs, lam)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_mask_with_gaps_and_lambda_constant_in_time_needs_no_next_valid_step(method):
    """With lambda constant in time, GAE under a mask with gaps is one recursion of
    the lambda-returns' mixture: no search for the next valid step (a ``cummin``)
    and no gather of it. With lambda varying in time ``associative`` still needs
    both, and the numbers match the reference either way."""
    inputs = make_episode((3, 21), seed=9)
    assert not np.all(inputs["mask"][:, 1:] <= inputs["mask"][:, :-1])  # a gap
    positional, options = split(inputs)
    per_step = np.random.default_rng(9).uniform(size=(3, 21)).astype(np.float32)
    for lambda_, searches in ((np.float32(0.8), False), (per_step, method == "associative")):
        gae = jax.jit(functools.partial(vf.gae, lambda_=lambda_, method=method))
        jaxpr = str(jax.make_jaxpr(gae)(*positional, **options))
        assert ("cummin" in jaxpr) == searches
        assert ("gather" in jaxpr) == searches
        lam = np.broadcast_to(lambda_, (3, 21))
        assert_gae_matches_reference(gae(*positional, **options), inputs, lam)


def test_discounts_are_gamma_except_at_terminations():
    terminated = np.array([[False, True, False], [True, False, False]])
    out = vf.discounts(0.9, terminated)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.where(terminated, 0.0, np.float32(0.9)), **TOL)
    np.testing.assert_allclose(vf.discounts(0.5, terminated.astype(np.int32)), 0.5 * ~terminated)


# Gradients.


def _grads(kernel, inputs, **kwargs):
    """Gradients of the sum of targets w.r.t. rewards, values and bootstrap_value."""

    def total(rewards, values, bootstrap_value):
        changed = {
            **inputs,
            "rewards": rewards,
            "values": values,
            "bootstrap_value": bootstrap_value,
        }
        return jnp.sum(call(kernel, changed, **kwargs))

    return jax.grad(total, argnums=(0, 1, 2))(
        inputs["rewards"], inputs["values"], inputs["bootstrap_value"]
    )


@pytest.mark.parametrize("name", sorted(set(KERNEL_NAMES) - {"td_errors"}))
def test_targets_carry_no_gradient_by_default(name):
    inputs = make_episode((3, 6), seed=1, truncations=False)
    for grad in _grads(KERNELS[name][0], inputs):
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("n", [3, 8, 70])
@pytest.mark.parametrize("masked", [False, "run", True])
@pytest.mark.parametrize("truncations", [False, True])
def test_n_step_targets_carry_no_gradient_on_every_path(n, masked, truncations):
    # n and the mask's layout pick among the unrolled, one-pass and looped forms.
    inputs = make_episode((3, 80), seed=2, masked=masked, truncations=truncations)
    for grad in _grads(vf.n_step_targets, inputs, n=n):
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    ("backend", "horizon", "scans"),
    [("cpu", 300, True), ("cpu", 100, True), ("gpu", 300, False), ("gpu", 100, True)],
)
def test_auto_takes_the_scan_on_a_cpu_and_for_short_horizons(monkeypatch, backend, horizon, scans):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    inputs = make_episode((2, horizon), seed=4, masked=False, truncations=False)
    jaxpr = str(jax.make_jaxpr(lambda i: call(gae_part(0), i, lambda_=0.8, method="auto"))(inputs))
    assert bool(re.search(r"\bscan\[", jaxpr)) == scans


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_eager_calls_compile_once_per_shape(name, caplog):
    # Called without jax.jit, a kernel compiles on its first call only: a scan of a
    # fresh closure would be compiled again at every call.
    kernel = KERNELS[name][0]
    call(kernel, make_episode((3, 40), seed=1))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        jax.block_until_ready(call(kernel, make_episode((3, 40), seed=2)))
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


def test_kernels_export_with_a_symbolic_batch_size():
    # jax.export's shape polymorphism: one serialised function for every batch size.
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, 6), jnp.float32)
    exported = jax.export.export(
        jax.jit(lambda r, v, m: vf.gae(r, v, 0.9, v[:, 0], 0.8, mask=m)[1])
    )(spec, spec, spec)
    inputs = make_episode((3, 6), seed=3, truncations=False)
    rewards, values, mask = (
        np.asarray(inputs[k], np.float32) for k in ("rewards", "values", "mask")
    )
    np.testing.assert_allclose(
        exported.call(rewards, values, mask),
        vf.gae(rewards, values, 0.9, values[:, 0], 0.8, mask=mask)[1],
        **TOL,
    )


# The kernels that take a method.
RECURSIVE = ["discounted_returns", "gae_advantages", "gae_returns", "lambda_returns"]


@pytest.mark.parametrize("name", RECURSIVE)
def test_pallas_targets_carry_no_gradient_by_default(name):
    # Its kernels have no derivative rule of their own: the gradient must still
    # be taken through a loss that computes its targets with them.
    inputs = make_episode((3, 6), seed=1, truncations=False)
    for grad in _grads(KERNELS[name][0], inputs, method="pallas"):
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_targets_pass_gradient_when_not_stopped(name):
    inputs = make_episode((3, 6), seed=1, masked=False, truncations=False)
    inputs["discounts"] = 0.9
    d_rewards, d_values, d_bootstrap = _grads(KERNELS[name][0], inputs, stop_target_gradients=False)
    assert np.all(np.asarray(d_rewards) != 0)
    assert np.all(np.asarray(d_bootstrap) != 0)
    if name != "discounted_returns":
        assert np.any(np.asarray(d_values) != 0)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_unstopped_derivative_is_the_reference_linear_map(name):
    """Targets are linear in (rewards, values, bootstrap_value, final_values), so
    their derivative in any direction is the reference applied to that direction."""
    kernel, reference = KERNELS[name]
    inputs = make_episode((3, 6), seed=2)
    direction = make_episode((3, 6), seed=12)
    keys = ("rewards", "values", "bootstrap_value", "final_values")

    def targets(*arrays):
        return call(
            kernel, {**inputs, **dict(zip(keys, arrays, strict=True))}, stop_target_gradients=False
        )

    _, derivative = jax.jvp(
        targets, tuple(inputs[key] for key in keys), tuple(direction[key] for key in keys)
    )
    expected = call(reference, {**inputs, **{key: direction[key] for key in keys}})
    np.testing.assert_allclose(derivative, expected, **TOL)


# Masks in one run take a path of their own (tested with the scan only: pallas
# off its fused kernels shares it); a mask with gaps with lambda constant in time
# takes the lambda-returns' recursion with each method's solver.
@pytest.mark.parametrize(
    ("method", "masked"),
    [("scan", True), ("associative", True), ("pallas", True), ("scan", "prefix"), ("scan", "run")],
)
@pytest.mark.parametrize("name", ["gae_advantages", "gae_returns", "discounted_returns"])
def test_unstopped_derivatives_over_several_blocks(name, method, masked):
    """Over blocks of the scan (T = 21, a partial first block), forward mode is the
    reference applied to the direction, and reverse mode is its transpose:
    ``<vjp(c), d> = <c, jvp(d)>``; with a mask with gaps, a right-padded one and
    one in one run."""
    kernel, reference = KERNELS[name]
    shape = (2, 21)
    inputs = make_episode(shape, seed=5, masked=masked)
    direction = make_episode(shape, seed=15)
    keys = ("rewards", "values", "bootstrap_value", "final_values")

    def targets(*arrays):
        changed = {**inputs, **dict(zip(keys, arrays, strict=True))}
        return call(kernel, changed, method=method, stop_target_gradients=False)

    tangents = {key: direction[key] for key in keys}
    expected = call(reference, {**inputs, **tangents})
    assert_derivatives_are_the_linear_map(targets, inputs, tangents, expected, seed=5)


def test_pallas_derivatives_in_lambda_and_discounts_match_scan():
    # Meta-gradients differentiate the recursion's coefficients too.
    inputs = make_episode((2, 21), seed=6)
    lambdas = np.random.default_rng(6).uniform(0.5, 1.0, size=(2, 21)).astype(np.float32)

    def grads(method):
        def total(lambda_, discounts):
            changed = {**inputs, "discounts": discounts}
            advantages, returns = call(
                vf.gae, changed, lambda_, method=method, stop_target_gradients=False
            )
            return jnp.sum(advantages * returns)

        return jax.grad(total, argnums=(0, 1))(lambdas, inputs["discounts"])

    for got, expected in zip(grads("pallas"), grads("scan"), strict=True):
        assert np.any(np.asarray(expected) != 0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_derivative_in_a_scalar_lambda_under_a_mask_with_gaps_matches_reference(method):
    """A meta-gradient in a lambda constant in time, under a mask with gaps, is the
    central difference of the NumPy references in lambda."""
    inputs = make_episode((3, 21), seed=10)
    assert not np.all(inputs["mask"][:, 1:] <= inputs["mask"][:, :-1])  # a gap
    weights = np.random.default_rng(10).normal(size=(2, 3, 21)).astype(np.float32)

    def reference_total(lambda_):
        lam = np.full((3, 21), lambda_, np.float64)
        advantages = call(ref.gae_advantages, inputs, lam).astype(np.float64)
        returns = call(ref.lambda_returns, inputs, lam).astype(np.float64)
        return np.sum(weights[0] * advantages) + np.sum(weights[1] * returns)

    def kernel_total(lambda_):
        advantages, returns = call(
            vf.gae, inputs, lambda_, method=method, stop_target_gradients=False
        )
        return jnp.sum(weights[0] * advantages) + jnp.sum(weights[1] * returns)

    step = 1e-2
    expected = (reference_total(0.7 + step) - reference_total(0.7 - step)) / (2 * step)
    assert abs(expected) > 0.1
    np.testing.assert_allclose(jax.grad(kernel_total)(jnp.float32(0.7)), expected, rtol=2e-3)


def test_td_error_gradient_flows_into_values_only():
    inputs = make_episode((3, 6), seed=3)
    d_rewards, d_values, d_bootstrap = _grads(vf.td_errors, inputs)
    np.testing.assert_array_equal(d_rewards, 0.0)
    np.testing.assert_array_equal(d_bootstrap, 0.0)
    np.testing.assert_array_equal(d_values, np.where(inputs["mask"], -1.0, 0.0))


# Batching, dtypes, jit and tracing.


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_batched_call_equals_vmap_over_rows(name):
    kernel, _ = KERNELS[name]
    inputs = make_episode((3, 6), seed=9)
    positional, options = split(inputs)
    keys = tuple(options)

    def row(rewards, values, discounts, bootstrap_value, *extra):
        return kernel(
            rewards, values, discounts, bootstrap_value, **dict(zip(keys, extra, strict=True))
        )

    mapped = jax.vmap(row)(*positional, *options.values())
    np.testing.assert_allclose(call(kernel, inputs), mapped, **TOL)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_outputs_are_float32_whatever_the_input_dtypes(name):
    kernel, reference = KERNELS[name]
    rng = np.random.default_rng(0)
    inputs = {
        "rewards": rng.integers(-3, 3, size=(2, 5)).astype(np.int32),
        "values": jnp.asarray(rng.normal(size=(2, 5)), jnp.bfloat16),
        "discounts": jnp.full((2, 5), 0.9, jnp.float16),
        "bootstrap_value": jnp.asarray(rng.normal(size=2), jnp.bfloat16),
        "mask": rng.integers(0, 2, size=(2, 5)).astype(np.int8),
    }
    out = call(kernel, inputs)
    assert out.dtype == jnp.float32
    as_f32 = {key: np.asarray(value, np.float32) for key, value in inputs.items()}
    np.testing.assert_allclose(out, call(reference, as_f32), **TOL)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in KERNEL_NAMES))
    def test_jit_equals_no_jit(self, name):
        kernel, reference = KERNELS[name]
        inputs = make_episode((3, 6), seed=10)
        out = self.variant(lambda inputs: call(kernel, inputs))(inputs)
        np.testing.assert_allclose(out, call(reference, inputs), **TOL)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_second_call_with_same_shapes_does_not_retrace(method):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def targets(inputs, lambda_):
        return call(vf.gae, inputs, lambda_, method=method), call(vf.n_step_targets, inputs, 3)

    first = targets(make_episode((3, 6), seed=0), 0.9)
    second = targets(make_episode((3, 6), seed=1), 0.5)
    assert not np.allclose(first[1], second[1])
    chex.clear_trace_counter()


# Bad input.

GOOD = make_episode((3, 5), seed=0)
BAD_INPUTS = [
    ("td_targets", {"values": np.zeros((3, 4))}, "values"),
    ("td_targets", {"values": np.zeros(5)}, "values"),
    ("td_targets", {"values": np.zeros((3, 5), np.complex64)}, "values"),
    ("td_targets", {"rewards": np.zeros((3, 5), bool)}, "rewards"),
    ("td_targets", {"rewards": np.zeros((3, 5), np.complex64)}, "rewards"),
    ("td_targets", {"rewards": np.float32(1.0), "values": np.float32(1.0)}, "rewards"),
    ("td_targets", {"bootstrap_value": np.zeros((3, 1))}, "bootstrap_value"),
    ("td_targets", {"bootstrap_value": np.zeros((3, 5))}, "bootstrap_value"),
    ("td_targets", {"bootstrap_value": np.zeros(3, np.complex64)}, "bootstrap_value"),
    ("td_targets", {"discounts": np.zeros(4)}, "discounts"),
    ("td_targets", {"discounts": np.zeros((2, 3, 5))}, "discounts"),
    ("td_targets", {"discounts": np.ones((3, 5), bool)}, "discounts"),
    ("td_targets", {"mask": np.ones((3, 4), bool)}, "mask"),
    ("td_targets", {"mask": np.ones((2, 3, 5), bool)}, "mask"),
    ("td_targets", {"mask": np.ones((3, 5), np.complex64)}, "mask"),
    ("td_targets", {"truncated": np.zeros((5, 3), bool)}, "truncated"),
    ("td_targets", {"final_values": np.zeros((3, 4))}, "final_values"),
    ("td_targets", {"final_values": None}, "final_values"),
    ("td_targets", {"truncated": None}, "truncated"),
    ("gae", {"rewards": [[1.0, 2.0], [3.0]]}, "rewards"),
    ("td_errors", {"values": np.zeros((3, 6))}, "values"),
    ("n_step_targets", {"n": 0}, "n"),
    ("n_step_targets", {"n": -2}, "n"),
    ("n_step_targets", {"n": 2.0}, "n"),
    ("n_step_targets", {"n": True}, "n"),
    ("n_step_targets", {"mask": np.ones(4, bool)}, "mask"),
    ("lambda_returns", {"lambda_": -0.1}, "lambda_"),
    ("lambda_returns", {"lambda_": 1.5}, "lambda_"),
    ("lambda_returns", {"lambda_": float("nan")}, "lambda_"),
    ("lambda_returns", {"lambda_": np.array([0.9, 0.9, 0.9, 0.9, 1.5])}, "lambda_"),
    (
        "td_targets",
        {
            **{name: np.zeros((3, 0)) for name in ("rewards", "values", "discounts")},
            **{"mask": None, "truncated": None, "final_values": None},
        },
        "rewards",
    ),
    ("lambda_returns", {"method": "fast"}, "method"),
    ("gae", {"lambda_": 2.0}, "lambda_"),
    ("gae", {"lambda_": np.full((3, 4), 0.5)}, "lambda_"),
    ("gae", {"method": "parallel"}, "method"),
    ("gae", {"bootstrap_value": np.zeros(4)}, "bootstrap_value"),
    ("discounted_returns", {"method": "loop"}, "method"),
    ("discounted_returns", {"rewards": np.zeros((3, 5), bool)}, "rewards"),
    ("discounted_returns", {"truncated": np.zeros((3, 6), bool)}, "truncated"),
]
EXTRA_ARGS = {
    "n_step_targets": {"n": 2},
    "lambda_returns": {"lambda_": 0.9},
    "gae": {"lambda_": 0.9},
}


@pytest.mark.parametrize(("name", "changes", "argument"), BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(name, changes, argument):
    kwargs = {**GOOD, **EXTRA_ARGS.get(name, {}), **changes}
    if name == "discounted_returns":
        del kwargs["values"]
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        getattr(vf, name)(**kwargs)


@pytest.mark.parametrize(
    "gamma", [-0.1, 1.5, float("nan"), np.full(2, 0.9), np.array([0.9, 0.9, -2.0])]
)
def test_discount_factor_outside_unit_interval_raises(gamma):
    with pytest.raises(ValueError, match=r"\bgamma\b"):
        vf.discounts(gamma, np.zeros(3, bool))


def test_discounts_name_terminated_when_it_is_not_real():
    with pytest.raises(ValueError, match=r"\bterminated\b"):
        vf.discounts(0.9, "no")
