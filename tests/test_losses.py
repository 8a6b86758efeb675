"""Value losses and statistics against plain NumPy loop references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from absl.testing import parameterized

import valuefn as vf

TOL = {"rtol": 1e-5, "atol": 1e-5}
KINDS = ("mse", "huber")
AGGREGATES = ("token_mean", "sequence_mean", "sum")
SHAPES = ((7,), (4, 6), (2, 3, 5))


def make_batch(shape, seed, *, masked=True):
    """Predictions, targets, old predictions and a mask with one empty sequence."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape).astype(np.float32)
    batch = {
        "values": values,
        "targets": (values + 2.0 * rng.normal(size=shape)).astype(np.float32),
        "old_values": (values + 0.5 * rng.normal(size=shape)).astype(np.float32),
    }
    if masked:
        mask = rng.random(shape) < 0.6
        if len(shape) > 1:
            mask[(0,) * (len(shape) - 1)] = False  # a sequence with no valid step
        batch["mask"] = mask
    return batch


def loss_options(batch, *, clipped, **options):
    options = {"mask": batch.get("mask"), **options}
    if clipped:
        options.update(old_values=batch["old_values"], clip_epsilon=0.2)
    return options


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_value_loss_matches_reference(shape, kind, aggregate, clipped, masked):
    batch = make_batch(shape, seed=len(shape), masked=masked)
    options = loss_options(batch, clipped=clipped, kind=kind, aggregate=aggregate, huber_delta=0.7)
    np.testing.assert_allclose(
        vf.value_loss(batch["values"], batch["targets"], **options),
        ref.value_loss(batch["values"], batch["targets"], **options),
        **TOL,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("clipped", [False, True])
def test_value_loss_and_masked_mean_weight_steps_by_a_fractional_mask(kind, aggregate, clipped):
    batch = make_batch((4, 6), seed=13)
    weights = np.random.default_rng(13).random((4, 6)).astype(np.float32)
    batch["mask"] = np.where(batch["mask"], weights, 0.0)
    options = loss_options(batch, clipped=clipped, kind=kind, aggregate=aggregate, huber_delta=0.7)
    np.testing.assert_allclose(
        vf.value_loss(batch["values"], batch["targets"], **options),
        ref.value_loss(batch["values"], batch["targets"], **options),
        **TOL,
    )
    np.testing.assert_allclose(
        vf.masked_mean(batch["targets"], batch["mask"]),
        ref.masked_mean(batch["targets"], batch["mask"]),
        **TOL,
    )


def test_huber_equals_mse_inside_delta_and_is_linear_outside():
    delta = 0.5
    residuals = np.linspace(-2.0, 2.0, 17, dtype=np.float32)
    zeros = np.zeros_like(residuals)
    for residual in residuals:
        v, y = np.float32([residual]), np.float32([0.0])
        huber = vf.value_loss(v, y, kind="huber", huber_delta=delta)
        expected = (
            0.5 * residual**2 if abs(residual) <= delta else delta * (abs(residual) - delta / 2)
        )
        np.testing.assert_allclose(huber, expected, **TOL)
    inside = np.abs(residuals) <= delta
    np.testing.assert_allclose(
        vf.value_loss(residuals, zeros, mask=inside, kind="huber", huber_delta=delta),
        vf.value_loss(residuals, zeros, mask=inside),
        **TOL,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_clipped_loss_is_the_unclipped_loss_within_epsilon(kind):
    batch = make_batch((4, 6), seed=0)
    close = batch["values"] + np.float32(0.05) * np.sign(batch["targets"])
    np.testing.assert_allclose(
        vf.value_loss(
            batch["values"], batch["targets"], old_values=close, clip_epsilon=0.2, kind=kind
        ),
        vf.value_loss(batch["values"], batch["targets"], kind=kind),
        **TOL,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_clipped_loss_is_never_below_the_unclipped_loss(kind):
    batch = make_batch((4, 6), seed=1, masked=False)
    per_step = dict(kind=kind, aggregate="sum")
    for i in np.ndindex(4, 6):
        one = {key: value[i][None] for key, value in batch.items()}
        clipped = vf.value_loss(
            one["values"],
            one["targets"],
            old_values=one["old_values"],
            clip_epsilon=0.2,
            **per_step,
        )
        assert clipped >= vf.value_loss(one["values"], one["targets"], **per_step)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_clip_fraction_matches_reference(shape, masked):
    batch = make_batch(shape, seed=2, masked=masked)
    args = (batch["values"], batch["targets"], batch["old_values"], 0.2)
    out = vf.clip_fraction(*args, mask=batch.get("mask"))
    assert 0.0 < out < 1.0
    np.testing.assert_allclose(out, ref.clip_fraction(*args, mask=batch.get("mask")), **TOL)


def test_clip_fraction_is_zero_inside_the_clip_range():
    # old + (v - old) rounds to v give or take an ulp in float32; no step is clipped.
    rng = np.random.default_rng(21)
    old = rng.normal(scale=0.1, size=(64, 64)).astype(np.float32)
    values = (old + rng.uniform(-0.19, 0.19, size=old.shape)).astype(np.float32)
    targets = rng.normal(scale=0.1, size=old.shape).astype(np.float32)
    assert ref.clip_fraction(values, targets, old, 0.2) == 0.0
    assert float(vf.clip_fraction(values, targets, old, 0.2)) == 0.0


# Gradients and optimisation.


@pytest.mark.parametrize("masked", [False, True])
def test_mse_gradient_is_residual_over_valid_count(masked):
    batch = make_batch((4, 6), seed=3, masked=masked)
    mask = batch.get("mask", np.ones((4, 6), bool))
    grad = jax.grad(vf.value_loss)(batch["values"], batch["targets"], mask=batch.get("mask"))
    expected = np.where(mask, batch["values"] - batch["targets"], 0.0) / mask.sum()
    np.testing.assert_allclose(grad, expected, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("clipped", [False, True])
def test_all_masked_loss_is_zero_with_zero_gradient(kind, aggregate, clipped):
    batch = make_batch((3, 5), seed=4)
    options = loss_options(batch, clipped=clipped, kind=kind, aggregate=aggregate)
    options["mask"] = np.zeros((3, 5), bool)
    loss, grad = jax.value_and_grad(vf.value_loss)(batch["values"], batch["targets"], **options)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("clipped", [False, True])
def test_masked_junk_changes_neither_loss_nor_gradient(kind, aggregate, clipped):
    clean = make_batch((4, 6), seed=5)
    valid = clean["mask"]
    junk = {
        key: np.where(valid, value, np.nan).astype(np.float32) if key != "mask" else value
        for key, value in clean.items()
    }

    def loss_and_grads(batch):
        # Also differentiate a traced clip_epsilon, which reads the old values.
        def loss(values, clip_epsilon):
            options = loss_options(batch, clipped=clipped, kind=kind, aggregate=aggregate)
            if clipped:
                options["clip_epsilon"] = clip_epsilon
            return vf.value_loss(values, batch["targets"], **options)

        return jax.value_and_grad(loss, argnums=(0, 1))(batch["values"], 0.2)

    loss, grads = loss_and_grads(junk)
    expected_loss, expected_grads = loss_and_grads(clean)
    np.testing.assert_allclose(loss, expected_loss, **TOL)
    for grad, expected in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, expected, **TOL)


def test_targets_carry_no_gradient_unless_asked():
    batch = make_batch((4, 6), seed=3)
    valid = batch["mask"]
    grad = jax.grad(vf.value_loss, argnums=1)(batch["values"], batch["targets"], mask=valid)
    np.testing.assert_array_equal(grad, 0.0)
    residual_gradient = jax.grad(vf.value_loss, argnums=1)(
        batch["values"], batch["targets"], mask=valid, stop_target_gradients=False
    )
    expected = np.where(valid, batch["targets"] - batch["values"], 0.0) / valid.sum()
    np.testing.assert_allclose(residual_gradient, expected, **TOL)


def test_clip_epsilon_and_huber_delta_may_be_traced():
    batch = make_batch((4, 6), seed=7)

    @jax.jit
    def loss(clip_epsilon, huber_delta):
        options = loss_options(batch, clipped=False, kind="huber", huber_delta=huber_delta)
        return vf.value_loss(
            batch["values"],
            batch["targets"],
            old_values=batch["old_values"],
            clip_epsilon=clip_epsilon,
            **options,
        )

    for clip_epsilon, huber_delta in [(0.1, 0.5), (0.3, 2.0)]:
        expected = ref.value_loss(
            batch["values"],
            batch["targets"],
            **loss_options(batch, clipped=False, kind="huber", huber_delta=huber_delta),
            old_values=batch["old_values"],
            clip_epsilon=clip_epsilon,
        )
        np.testing.assert_allclose(loss(clip_epsilon, huber_delta), expected, **TOL)


def test_constant_minimising_the_mse_loss_is_the_mean_return():
    rng = np.random.default_rng(6)
    returns = rng.normal(loc=3.0, scale=2.0, size=(8, 16)).astype(np.float32)
    mask = rng.random((8, 16)) < 0.7
    optimizer = optax.sgd(0.5)

    def loss(constant):
        return vf.value_loss(jnp.broadcast_to(constant, returns.shape), returns, mask=mask)

    @jax.jit
    def fit(constant):
        def step(carry, _):
            constant, opt_state = carry
            updates, opt_state = optimizer.update(jax.grad(loss)(constant), opt_state)
            return (optax.apply_updates(constant, updates), opt_state), None

        (constant, _), _ = jax.lax.scan(step, (constant, optimizer.init(constant)), None, 100)
        return constant

    np.testing.assert_allclose(fit(jnp.float32(0.0)), np.mean(returns[mask]), **TOL)


# Statistics.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_explained_variance_matches_reference(shape, masked):
    batch = make_batch(shape, seed=7, masked=masked)
    args = (batch["values"], batch["targets"], batch.get("mask"))
    np.testing.assert_allclose(vf.explained_variance(*args), ref.explained_variance(*args), **TOL)


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    targets = np.random.default_rng(8).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(vf.explained_variance(targets, targets), 1.0, **TOL)
    mean = np.full_like(targets, targets.mean())
    np.testing.assert_allclose(vf.explained_variance(mean, targets), 0.0, **TOL)


@pytest.mark.parametrize("constant", [0.0, 0.1, 3.3, 123.456])
@pytest.mark.parametrize("size", [5, 7, 13])
@pytest.mark.parametrize("first_masked", [False, True])
def test_explained_variance_is_zero_for_constant_targets(constant, size, first_masked):
    targets = np.full(size, constant, np.float32)
    values = targets + np.linspace(-1, 1, size, dtype=np.float32)
    mask = np.ones(size, bool)
    if first_masked:  # the junk there must not set the shift that makes the variance 0
        mask[0], targets[0] = False, constant - 1.0
    assert vf.explained_variance(values, targets, mask) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_masked_mean_matches_reference(shape, masked):
    batch = make_batch(shape, seed=9, masked=masked)
    np.testing.assert_allclose(
        vf.masked_mean(batch["targets"], batch.get("mask")),
        ref.masked_mean(batch["targets"], batch.get("mask")),
        **TOL,
    )


def test_masked_mean_reduces_the_given_axis():
    batch = make_batch((4, 6), seed=10)
    out = vf.masked_mean(batch["targets"], batch["mask"], axis=-1)
    expected = [
        ref.masked_mean(row, row_mask)
        for row, row_mask in zip(batch["targets"], batch["mask"], strict=True)
    ]
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_masked_whiten_matches_reference(shape, masked):
    batch = make_batch(shape, seed=11, masked=masked)
    x, mask = batch["targets"], batch.get("mask")
    np.testing.assert_allclose(vf.masked_whiten(x, mask), ref.masked_whiten(x, mask), **TOL)
    valid = np.ones(shape, bool) if mask is None else mask
    np.testing.assert_allclose(
        vf.masked_whiten(x, mask, shift_mean=False),
        np.where(valid, ref.masked_whiten(x, mask) + ref.masked_mean(x, mask), 0.0),
        **TOL,
    )


@pytest.mark.parametrize("name", ["masked_mean", "masked_whiten", "explained_variance"])
def test_statistics_ignore_masked_junk_and_give_zero_when_all_masked(name):
    batch = make_batch((4, 6), seed=12)
    valid = batch["mask"]
    statistic = {
        "masked_mean": lambda x, mask: vf.masked_mean(x, mask),
        "masked_whiten": lambda x, mask: vf.masked_whiten(x, mask),
        "explained_variance": lambda x, mask: vf.explained_variance(batch["values"], x, mask),
    }[name]
    junk = np.where(valid, batch["targets"], np.nan)
    np.testing.assert_allclose(statistic(junk, valid), statistic(batch["targets"], valid), **TOL)
    np.testing.assert_array_equal(statistic(junk, np.zeros_like(valid)), 0.0)


@pytest.mark.parametrize("name", ["masked_mean", "masked_whiten", "explained_variance"])
def test_statistics_send_no_nan_gradient_back_from_masked_junk(name):
    batch = make_batch((4, 6), seed=12)
    valid = batch["mask"]
    weights = np.random.default_rng(0).normal(size=valid.shape).astype(np.float32)
    statistic = {
        "masked_mean": lambda x, y: vf.masked_mean(x, valid),
        "masked_whiten": lambda x, y: jnp.sum(weights * vf.masked_whiten(x, valid)),
        "explained_variance": lambda x, y: vf.explained_variance(x, y, valid),
    }[name]

    def gradient(fill):
        values, targets = (np.where(valid, batch[k], fill) for k in ("values", "targets"))
        return jax.grad(statistic)(values.astype(np.float32), targets.astype(np.float32))

    clean = gradient(0.0)
    assert np.all(clean[valid] != 0.0)
    for fill in (np.nan, np.inf):
        np.testing.assert_allclose(gradient(fill), clean, **TOL)
    np.testing.assert_array_equal(clean[~valid], 0.0)


def test_explained_variance_of_no_steps_is_zero():
    assert vf.explained_variance(np.zeros((2, 0)), np.zeros((2, 0))) == 0.0


# Dtypes, jit and bad input.


def test_losses_are_float32_for_low_precision_inputs():
    batch = make_batch((4, 6), seed=13)
    values = jnp.asarray(batch["values"], jnp.bfloat16)
    targets = jnp.asarray(batch["targets"], jnp.float16)
    for out in (
        vf.value_loss(values, targets, mask=batch["mask"]),
        vf.explained_variance(values, targets, batch["mask"]),
        vf.masked_mean(values, batch["mask"]),
        vf.masked_whiten(values, batch["mask"]),
    ):
        assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        vf.value_loss(values, targets, mask=batch["mask"]),
        ref.value_loss(
            np.asarray(values, np.float32), np.asarray(targets, np.float32), mask=batch["mask"]
        ),
        **TOL,
    )


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(kind=KINDS, aggregate=AGGREGATES)
    def test_jit_equals_no_jit(self, kind, aggregate):
        batch = make_batch((4, 6), seed=14)
        options = loss_options(batch, clipped=True, kind=kind, aggregate=aggregate)
        out = self.variant(lambda v, y: vf.value_loss(v, y, **options))(
            batch["values"], batch["targets"]
        )
        expected = ref.value_loss(batch["values"], batch["targets"], **options)
        np.testing.assert_allclose(out, expected, **TOL)


def test_second_loss_call_with_same_shapes_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(batch):
        return vf.value_loss(batch["values"], batch["targets"], **loss_options(batch, clipped=True))

    assert loss(make_batch((4, 6), seed=0)) != loss(make_batch((4, 6), seed=1))
    chex.clear_trace_counter()


VALUES = np.zeros((3, 5), np.float32)
BAD_LOSS_INPUTS = [
    ({"targets": np.zeros((3, 4))}, "targets"),
    ({"targets": np.zeros(5)}, "targets"),
    ({"targets": np.zeros((3, 5), np.complex64)}, "targets"),
    ({"values": np.zeros((3, 5), np.complex64)}, "values"),
    ({"mask": np.ones((3, 4), bool)}, "mask"),
    ({"mask": np.ones((2, 3, 5), bool)}, "mask"),
    ({"old_values": np.zeros((3, 4)), "clip_epsilon": 0.2}, "old_values"),
    ({"old_values": VALUES}, "clip_epsilon"),
    ({"clip_epsilon": 0.2}, "old_values"),
    ({"old_values": VALUES, "clip_epsilon": 0.0}, "clip_epsilon"),
    ({"old_values": VALUES, "clip_epsilon": -1.0}, "clip_epsilon"),
    ({"old_values": VALUES, "clip_epsilon": np.full(5, 0.2)}, "clip_epsilon"),
    ({"kind": "l1"}, "kind"),
    ({"kind": "huber", "huber_delta": 0.0}, "huber_delta"),
    ({"kind": "huber", "huber_delta": None}, "huber_delta"),
    ({"aggregate": "mean"}, "aggregate"),
]


@pytest.mark.parametrize(("changes", "argument"), BAD_LOSS_INPUTS)
def test_bad_loss_input_raises_value_error_naming_the_argument(changes, argument):
    kwargs = {"values": VALUES, "targets": VALUES, **changes}
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        vf.value_loss(**kwargs)


@pytest.mark.parametrize(
    ("statistic", "kwargs", "argument"),
    [
        (vf.explained_variance, {"values": VALUES, "targets": np.zeros((3, 4))}, "targets"),
        (vf.explained_variance, {"values": VALUES, "targets": VALUES, "mask": np.ones(4)}, "mask"),
        (vf.masked_mean, {"x": VALUES, "mask": np.ones(4, bool)}, "mask"),
        (vf.masked_mean, {"x": VALUES.astype(np.complex64)}, "x"),
        (vf.masked_whiten, {"x": VALUES, "mask": np.ones((5, 3), bool)}, "mask"),
        (vf.masked_whiten, {"x": VALUES, "eps": 0.0}, "eps"),
        (vf.masked_whiten, {"x": VALUES, "eps": -1.0}, "eps"),
        (
            vf.clip_fraction,
            {"values": VALUES, "targets": VALUES, "old_values": VALUES[0], "clip_epsilon": 0.2},
            "old_values",
        ),
    ],
)
def test_bad_statistic_input_raises_value_error_naming_the_argument(statistic, kwargs, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        statistic(**kwargs)
