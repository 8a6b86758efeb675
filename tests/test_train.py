"""The update step: exact Optax arithmetic, the semi-gradient, skipping, PopArt and TD(0)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import valuefn
from valuefn.train import init_return_stats

ROWS, STEPS, FEATURES = 8, 5, 3


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def make_batch(seed=0, rows=ROWS, *, old_values=False, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(rows, STEPS, FEATURES)).astype(np.float32)
    # A smooth function of the inputs, so that a small critic can fit it.
    signal = np.sin(inputs @ np.array([1.0, -0.5, 0.25])) + 0.1 * rng.normal(size=(rows, STEPS))
    return valuefn.Batch(
        inputs=inputs,
        targets=(shift + scale * signal).astype(np.float32),
        mask=(rng.random((rows, STEPS)) > 0.2).astype(np.float32),
        old_values=(0.3 * rng.normal(size=(rows, STEPS))).astype(np.float32)
        if old_values
        else None,
    )


def make_model(seed=0, head_seed=None):
    model = valuefn.MLPValue(FEATURES, (16,), rngs=nnx.Rngs(seed))
    if head_seed is not None:
        rng = np.random.default_rng(head_seed)
        model.head.kernel[...] = jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)
        model.head.bias[...] = jnp.asarray(rng.normal(size=(1,)), jnp.float32)
    return model


def numpy_clipped_loss(values, targets, mask, old_values, clip_epsilon):
    """PPO clipped value loss written out with NumPy, token mean over the mask."""
    clipped = old_values + np.clip(values - old_values, -clip_epsilon, clip_epsilon)
    losses = 0.5 * np.maximum((values - targets) ** 2, (clipped - targets) ** 2)
    return np.sum(losses * mask) / np.sum(mask)


def test_update_step_equals_hand_written_grad_and_optax_step():
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    model = make_model(head_seed=1)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    params = host(state.params)
    batch = make_batch(old_values=True)

    def loss_fn(params):
        values = nnx.merge(graphdef, params)(batch.inputs)
        clipped = batch.old_values + jnp.clip(values - batch.old_values, -0.2, 0.2)
        losses = 0.5 * jnp.maximum(
            jnp.square(values - batch.targets), jnp.square(clipped - batch.targets)
        )
        return jnp.sum(losses * batch.mask) / jnp.sum(batch.mask)

    @jax.jit
    def reference(params):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, optimizer.init(params), params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    loss, grads, expected_params, expected_opt_state = reference(params)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    state, metrics = update_step(state, batch)

    tolerance = dict(rtol=1e-6, atol=1e-7)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **tolerance),
        host(state.params),
        host(expected_params),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **tolerance),
        host(state.opt_state),
        host(expected_opt_state),
    )
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["value_loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    values = np.asarray(nnx.merge(graphdef, params)(batch.inputs))
    np.testing.assert_allclose(
        metrics["value_loss"],
        numpy_clipped_loss(values, batch.targets, batch.mask, batch.old_values, 0.2),
        rtol=1e-5,
    )
    mask = batch.mask.astype(bool)
    np.testing.assert_allclose(metrics["value_mean"], values[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["target_mean"], batch.targets[mask].mean(), rtol=1e-5)
    residual_var = np.var(batch.targets[mask] - values[mask])
    np.testing.assert_allclose(
        metrics["explained_variance"], 1 - residual_var / np.var(batch.targets[mask]), rtol=1e-4
    )
    clipped = np.clip(values - batch.old_values, -0.2, 0.2) + batch.old_values
    active = (clipped - batch.targets) ** 2 > (values - batch.targets) ** 2
    np.testing.assert_allclose(metrics["clip_fraction"], active[mask].mean(), rtol=1e-6)
    assert int(metrics["skipped"]) == 0


def test_gradient_is_the_semi_gradient_with_td0_targets_from_own_predictions():
    """Targets built from V(s') of the same parameters still act as constants."""
    gamma = 0.9
    model = make_model(head_seed=2)
    optimizer = optax.sgd(1.0)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    rng = np.random.default_rng(5)
    states = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    next_states = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    rewards = rng.normal(size=(ROWS, 1)).astype(np.float32)
    params = host(state.params)

    def td0_targets(params, stop_target_gradients):
        values = nnx.merge(graphdef, params)(states)[:, None]
        next_values = nnx.merge(graphdef, params)(next_states)
        return valuefn.td_targets(
            rewards,
            values,
            gamma,
            next_values,
            stop_target_gradients=stop_target_gradients,
        )[:, 0]

    def squared_error(params, targets):
        values = nnx.merge(graphdef, params)(states)
        return 0.5 * jnp.mean(jnp.square(values - targets))

    update_step = valuefn.make_update_step(graphdef, optimizer)

    def loss_through_the_step(params):
        batch = valuefn.Batch(states, td0_targets(params, stop_target_gradients=False))
        # The step donates what it is given: hand it copies of the other fields.
        _, metrics = update_step(jax.tree.map(jnp.array, state)._replace(params=params), batch)
        return metrics["value_loss"]

    through_step = jax.grad(loss_through_the_step)(params)
    frozen_targets = np.asarray(td0_targets(params, stop_target_gradients=True))
    semi = jax.grad(squared_error)(params, frozen_targets)
    residual = jax.grad(lambda p: squared_error(p, td0_targets(p, False)))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), through_step, semi
    )
    differences = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), semi, residual)
    assert max(jax.tree.leaves(differences)) > 1e-3

    # And the step itself moves the parameters by exactly that gradient (SGD, rate 1).
    new_state, _ = update_step(
        jax.tree.map(jnp.array, state), valuefn.Batch(states, frozen_targets)
    )
    moved = jax.tree.map(lambda old, new: old - new, params, host(new_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), moved, semi)


class CountedBackbone(nnx.Module):
    """A backbone whose forward pass counts how often it is traced."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(FEATURES, 16, rngs=rngs)

    @chex.assert_max_traces(n=1)
    def __call__(self, x):
        return jax.nn.relu(self.linear(x))


def test_loss_decreases_on_a_fixed_batch_with_one_trace():
    chex.clear_trace_counter()
    model = valuefn.ValueHead(CountedBackbone(nnx.Rngs(0)), 16, rngs=nnx.Rngs(1))
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer)
    batch = make_batch()
    losses = []
    for _ in range(40):
        state, metrics = update_step(state, batch)
        losses.append(float(metrics["value_loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses[:5], losses[1:6], strict=True))
    # A new batch of the same shape reuses the compiled step.
    state, _ = update_step(state, make_batch(seed=1))
    assert int(state.step) == 41


def test_non_finite_step_leaves_params_and_optimizer_state_untouched():
    model = make_model(head_seed=3)
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer)
    state, _ = update_step(state, make_batch(seed=0))
    before = host(state)

    batch = make_batch(seed=1)
    targets = batch.targets.copy()
    targets[2, 1] = np.nan
    mask = batch.mask.copy()
    mask[2, 1] = 1.0
    state, metrics = update_step(state, batch._replace(targets=targets, mask=mask))
    assert int(metrics["skipped"]) == 1
    assert_trees_equal(state.params, before.params)
    assert_trees_equal(state.opt_state, before.opt_state)
    assert int(state.step) == int(before.step)

    # A NaN on a masked-out step is ignored: the step goes ahead.
    mask[2, 1] = 0.0
    state, metrics = update_step(state, batch._replace(targets=targets, mask=mask))
    assert int(metrics["skipped"]) == 0
    assert int(state.step) == int(before.step) + 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host(state.params)))


def test_vmapped_steps_skip_each_critic_on_its_own():
    # Under vmap the state is chosen by a select per leaf on a condition per critic.
    # adam with eps=0 turns the body's zero gradients under a zero-initialised head
    # into 0 / 0: the second critic's updates are not finite though its loss is.
    optimizer = optax.adam(1e-2, eps=0.0)
    graphdef, _ = valuefn.init_train_state(make_model(), optimizer)
    states = [valuefn.init_train_state(make_model(head_seed=s), optimizer)[1] for s in (3, None)]
    stack = functools.partial(jax.tree.map, lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]))
    update_step = valuefn.make_update_step(graphdef, optimizer)
    before = host(states)
    batch = make_batch()
    batched, metrics = jax.jit(jax.vmap(update_step))(stack(*states), stack(batch, batch))
    np.testing.assert_array_equal(metrics["skipped"], [0, 1])
    np.testing.assert_array_equal(batched.step, [1, 0])
    alone, _ = update_step(jax.tree.map(jnp.asarray, before[0]), batch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        host(jax.tree.map(lambda x: x[0], batched)),
        host(alone),
    )
    assert_trees_equal(jax.tree.map(lambda x: x[1], batched), before[1])


def test_optimizers_that_read_the_loss_get_it():
    # reduce_on_plateau cuts its scale after `patience` steps without improvement
    # of the loss it is given: a loss that never moves (learning rate 0) must cut it.
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=2, cooldown=0)
    optimizer = optax.chain(optax.sgd(0.0), plateau)
    graphdef, state = valuefn.init_train_state(make_model(head_seed=3), optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer)
    for _ in range(6):
        state, _ = update_step(state, make_batch())
    assert float(state.opt_state[1].scale) < 1.0


def test_finite_gradients_with_non_finite_updates_are_skipped():
    # The zero-initialised head gives the body zero gradients at the first step;
    # adam with eps=0 turns them into 0 / 0.
    optimizer = optax.adam(1e-2, eps=0.0)
    graphdef, state = valuefn.init_train_state(make_model(), optimizer)
    before = host(state)
    state, metrics = valuefn.make_update_step(graphdef, optimizer)(state, make_batch())
    assert int(metrics["skipped"]) == 1
    assert_trees_equal(state.params, before.params)


def test_empty_or_non_finite_batches_change_nothing_with_decay_or_normaliser():
    # AdamW decays the weights and moves its moments even on a zero gradient, and
    # the normaliser would move its statistics: a step that is not taken must not.
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    graphdef, state = valuefn.init_train_state(make_model(head_seed=3), optimizer)
    update_step = valuefn.make_update_step(
        graphdef, optimizer, normalizer=valuefn.ReturnNormalizer()
    )
    state, _ = update_step(state, make_batch(seed=0, scale=10.0, shift=100.0))
    before = host(state)

    batch = make_batch(seed=1, scale=10.0, shift=100.0)
    inputs = batch.inputs.copy()
    inputs[3, 2] = np.nan
    for spoilt in (
        batch._replace(mask=np.zeros_like(batch.mask)),
        batch._replace(inputs=inputs),
    ):
        state, metrics = update_step(state, spoilt)
        assert int(metrics["skipped"]) == 1
        assert_trees_equal(state, before)

    epochs_step = valuefn.make_epochs_step(
        graphdef, optimizer, num_epochs=2, num_minibatches=2, normalizer=valuefn.ReturnNormalizer()
    )
    inputs[:, 2] = np.nan  # every minibatch spoilt
    state, metrics = epochs_step(state, batch._replace(inputs=inputs), jax.random.key(0))
    assert int(metrics["skipped"]) == 4
    assert_trees_equal(state, before)


def test_update_step_donates_its_state():
    model = make_model()
    optimizer = optax.sgd(0.1)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer)
    leaf = jax.tree.leaves(state.params)[0]
    update_step(state, make_batch())
    assert leaf.is_deleted()


def test_td0_learns_the_closed_form_values_of_a_markov_chain():
    """V = (I - gamma P)^-1 r, learned from sampled transitions (s, r(s), s')."""
    num_states, gamma, steps, batch_size = 6, 0.9, 400, 256
    rng = np.random.default_rng(0)
    transitions = rng.random((num_states, num_states)) ** 3
    transitions /= transitions.sum(axis=1, keepdims=True)
    rewards = rng.normal(size=num_states)
    true_values = np.linalg.solve(np.eye(num_states) - gamma * transitions, rewards)

    model = valuefn.MLPValue(num_states, (32,), rngs=nnx.Rngs(0))
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-2, steps))
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer)
    one_hot = np.eye(num_states, dtype=np.float32)
    cumulative = np.cumsum(transitions, axis=1)
    for _ in range(steps):
        s = rng.integers(0, num_states, batch_size)
        s_next = np.minimum(
            (rng.random((batch_size, 1)) > cumulative[s]).sum(axis=1), num_states - 1
        )
        v_next = valuefn.predict(graphdef, state.params, one_hot[s_next])
        targets = valuefn.td_targets(
            rewards[s, None].astype(np.float32), np.zeros((batch_size, 1)), gamma, v_next
        )
        state, metrics = update_step(state, valuefn.Batch(one_hot[s][:, None], targets))
    learned = np.asarray(valuefn.predict(graphdef, state.params, one_hot))
    assert int(metrics["skipped"]) == 0
    # Sampling noise in the targets leaves about 1% of the value range.
    np.testing.assert_allclose(learned, true_values, atol=0.1)


def test_popart_rescale_leaves_predictions_unchanged_when_statistics_move():
    model = make_model(head_seed=4)
    # A zero learning rate isolates the rescale from the gradient step.
    optimizer = optax.sgd(0.0)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(
        graphdef, optimizer, normalizer=valuefn.ReturnNormalizer()
    )
    batches = [make_batch(seed=1, scale=10.0, shift=50.0), make_batch(seed=2, scale=3.0)]
    inputs = batches[0].inputs
    seen = []
    for batch in batches:
        before = np.asarray(valuefn.predict(graphdef, state.params, inputs, state.return_stats))
        old_stats, old_head = host(state.return_stats), host(state.params["head"])
        state, metrics = update_step(state, batch)
        after = np.asarray(valuefn.predict(graphdef, state.params, inputs, state.return_stats))
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4)
        assert abs(float(state.return_stats.mean) - old_stats.mean) > 1.0
        assert not np.allclose(host(state.params["head"])["kernel"], old_head["kernel"])

        seen.append(batch.targets[batch.mask.astype(bool)])
        targets = np.concatenate(seen)
        np.testing.assert_allclose(state.return_stats.mean, targets.mean(), rtol=1e-5)
        np.testing.assert_allclose(state.return_stats.var, targets.var(), rtol=1e-4)
        np.testing.assert_allclose(state.return_stats.std, targets.std(), rtol=1e-4)
        assert float(state.return_stats.count) == targets.size
        np.testing.assert_allclose(
            metrics["target_mean"], batch.targets[batch.mask > 0].mean(), rtol=1e-5
        )


def test_clipped_loss_under_popart_normalises_targets_and_old_values_alike():
    model = make_model(head_seed=8)
    # A zero learning rate leaves the rescaled head that the loss was taken with.
    optimizer = optax.sgd(0.0)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(
        graphdef, optimizer, normalizer=valuefn.ReturnNormalizer(), clip_epsilon=0.2
    )
    batch = make_batch(seed=3, scale=10.0, shift=100.0)
    # Old predictions around the critic's own, on both sides, so that some clip.
    values = np.asarray(valuefn.predict(graphdef, state.params, batch.inputs, state.return_stats))
    noise = np.random.default_rng(3).normal(size=values.shape)
    old_values = (values + 8.0 * noise).astype(np.float32)
    batch = batch._replace(old_values=old_values)
    state, metrics = update_step(state, batch)

    stats = host(state.return_stats)
    values = valuefn.predict(graphdef, state.params, batch.inputs, state.return_stats)
    normalise = lambda x: (np.asarray(x, np.float64) - stats.mean) / stats.std  # noqa: E731
    values, targets, old = normalise(values), normalise(batch.targets), normalise(old_values)
    np.testing.assert_allclose(
        metrics["value_loss"],
        numpy_clipped_loss(values, targets, batch.mask, old, 0.2),
        rtol=1e-4,
    )
    outside = np.abs(values - old) > 0.2
    clipped = old + np.clip(values - old, -0.2, 0.2)
    active = outside & ((clipped - targets) ** 2 > (values - targets) ** 2)
    np.testing.assert_allclose(
        metrics["clip_fraction"], np.sum(active * batch.mask) / np.sum(batch.mask), atol=1e-6
    )
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0


def test_popart_learns_large_targets_that_the_raw_critic_cannot_reach():
    batch = make_batch(scale=100.0, shift=1000.0)
    mask = batch.mask.astype(bool)
    optimizer = optax.adam(3e-2)
    results = {}
    for name, normalizer in [("popart", valuefn.ReturnNormalizer(decay=0.1)), ("raw", None)]:
        graphdef, state = valuefn.init_train_state(make_model(), optimizer)
        update_step = valuefn.make_update_step(graphdef, optimizer, normalizer=normalizer)
        for _ in range(100):
            state, metrics = update_step(state, batch)
        values = valuefn.predict(graphdef, state.params, batch.inputs, state.return_stats)
        results[name] = (np.asarray(values)[mask], float(metrics["explained_variance"]))
    targets = batch.targets[mask]
    popart_values, popart_ev = results["popart"]
    raw_values, _ = results["raw"]
    assert popart_ev > 0.5
    assert abs(popart_values.mean() - targets.mean()) < 20.0
    # Adam moves each raw parameter by about the learning rate per step.
    assert abs(raw_values.mean() - targets.mean()) > 500.0


@pytest.mark.parametrize("decay", [0.25, 1.0])
def test_exponential_return_statistics(decay):
    model = make_model(head_seed=5)
    optimizer = optax.sgd(0.0)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(
        graphdef, optimizer, normalizer=valuefn.ReturnNormalizer(decay=decay)
    )
    mean, second = None, None
    for seed in range(3):
        batch = make_batch(seed=seed, scale=seed + 1.0, shift=5.0 * seed)
        y = batch.targets[batch.mask.astype(bool)].astype(np.float64)
        if mean is None:
            mean, second = y.mean(), np.mean(y**2)
        else:
            mean = (1 - decay) * mean + decay * y.mean()
            second = (1 - decay) * second + decay * np.mean(y**2)
        state, _ = update_step(state, batch)
        np.testing.assert_allclose(state.return_stats.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(state.return_stats.var, second - mean**2, rtol=1e-4)


def test_epochs_step_equals_the_same_minibatch_steps_one_by_one():
    num_epochs, num_minibatches = 3, 2
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(make_model(head_seed=6), optimizer)
    loose = jax.tree.map(jnp.array, state)
    batch = make_batch(old_values=True)
    key = jax.random.key(7)
    epochs_step = valuefn.make_epochs_step(
        graphdef,
        optimizer,
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        clip_epsilon=0.2,
    )
    state, metrics = epochs_step(state, batch, key)

    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    size = ROWS // num_minibatches
    losses = []
    for epoch_key in jax.random.split(key, num_epochs):
        order = np.asarray(jax.random.permutation(epoch_key, ROWS))
        for i in range(num_minibatches):
            rows = order[i * size : (i + 1) * size]
            loose, step_metrics = update_step(loose, jax.tree.map(lambda x, r=rows: x[r], batch))
            losses.append(float(step_metrics["value_loss"]))
    assert int(state.step) == num_epochs * num_minibatches
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        host(state.params),
        host(loose.params),
    )
    np.testing.assert_allclose(metrics["value_loss"], np.mean(losses), rtol=1e-5)
    assert int(metrics["skipped"]) == 0


@pytest.mark.parametrize("mask_shape", [(STEPS,), (ROWS, 1)])
def test_epochs_step_broadcasts_a_mask_as_the_loss_does(mask_shape):
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(make_model(head_seed=9), optimizer)
    epochs_step = valuefn.make_epochs_step(graphdef, optimizer, num_epochs=2, num_minibatches=2)
    batch = make_batch(seed=4)
    mask = (np.random.default_rng(4).random(mask_shape) > 0.3).astype(np.float32)
    full = batch._replace(mask=np.broadcast_to(mask, batch.targets.shape).copy())
    results = [
        epochs_step(jax.tree.map(jnp.array, state), b, jax.random.key(1))
        for b in (batch._replace(mask=mask), full)
    ]
    assert_trees_equal(*results)


def test_epochs_step_counts_skipped_minibatches():
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(make_model(), optimizer)
    batch = make_batch()
    targets = batch.targets.copy()
    targets[0, :] = np.nan
    mask = np.ones_like(batch.mask)
    epochs_step = valuefn.make_epochs_step(graphdef, optimizer, num_epochs=3, num_minibatches=4)
    state, metrics = epochs_step(
        state, batch._replace(targets=targets, mask=mask), jax.random.key(0)
    )
    # Row 0 spoils one minibatch in each of the 3 epochs.
    assert int(metrics["skipped"]) == 3
    assert int(state.step) == 3 * 4 - 3
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host(state.params)))
    # The metrics are those of the 9 steps taken, not NaN from the 3 skipped.
    assert all(np.isfinite(float(value)) for value in metrics.values())


def test_skipped_is_int32_from_both_steps_under_x64():
    with jax.enable_x64(True):
        optimizer = optax.adam(1e-2)
        graphdef, state = valuefn.init_train_state(make_model(), optimizer)
        state, metrics = valuefn.make_update_step(graphdef, optimizer)(state, make_batch())
        epochs_step = valuefn.make_epochs_step(graphdef, optimizer, num_epochs=1, num_minibatches=2)
        _, summary = epochs_step(state, make_batch(), jax.random.key(0))  # the step donates
    assert metrics["skipped"].dtype == summary["skipped"].dtype == jnp.int32


def test_epochs_step_with_normalizer_moves_statistics_once_per_call():
    optimizer = optax.adam(1e-2)
    graphdef, state = valuefn.init_train_state(make_model(), optimizer)
    epochs_step = valuefn.make_epochs_step(
        graphdef,
        optimizer,
        num_epochs=2,
        num_minibatches=2,
        normalizer=valuefn.ReturnNormalizer(),
    )
    batch = make_batch(scale=4.0, shift=-3.0)
    state, _ = epochs_step(state, batch, jax.random.key(1))
    valid = batch.targets[batch.mask.astype(bool)]
    assert float(state.return_stats.count) == valid.size
    np.testing.assert_allclose(state.return_stats.mean, valid.mean(), rtol=1e-5)


def test_init_train_state_gives_identity_statistics_and_own_buffers():
    graphdef, state = valuefn.init_train_state(make_model(), optax.adam(1e-3))
    assert_trees_equal(state.return_stats, init_return_stats())
    assert int(state.step) == 0
    assert isinstance(state.params, dict)
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(buffers)) == len(buffers)
    np.testing.assert_array_equal(
        valuefn.predict(graphdef, state.params, np.ones((2, FEATURES), np.float32)), 0.0
    )


def test_bad_arguments_raise_value_error_naming_them():
    optimizer = optax.sgd(0.1)
    graphdef, state = valuefn.init_train_state(make_model(), optimizer)
    with pytest.raises(ValueError, match="unknown loss options"):
        valuefn.make_update_step(graphdef, optimizer, clip=0.2)
    with pytest.raises(ValueError, match="kind"):
        valuefn.make_update_step(graphdef, optimizer, kind="l1")
    with pytest.raises(ValueError, match="num_minibatches"):
        valuefn.make_epochs_step(graphdef, optimizer, num_epochs=1, num_minibatches=0)
    with pytest.raises(ValueError, match="decay"):
        valuefn.ReturnNormalizer(decay=1.5)
    with pytest.raises(ValueError, match="model"):
        valuefn.init_train_state(lambda x: x, optimizer)
    with pytest.raises(ValueError, match="nnx.Param"):
        valuefn.init_train_state(nnx.BatchNorm(3, rngs=nnx.Rngs(0)), optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    with pytest.raises(ValueError, match="old_values"):
        update_step(state, make_batch())
    epochs_step = valuefn.make_epochs_step(graphdef, optimizer, num_epochs=1, num_minibatches=3)
    with pytest.raises(ValueError, match="must divide the batch size 8"):
        epochs_step(state, make_batch(), jax.random.key(0))
    epochs_step = valuefn.make_epochs_step(graphdef, optimizer, num_epochs=1, num_minibatches=2)
    with pytest.raises(ValueError, match=r"batch.mask has shape \(8, 3\)"):
        epochs_step(state, make_batch()._replace(mask=np.ones((8, 3))), jax.random.key(0))
    update_step = valuefn.make_update_step(graphdef, optimizer)
    batch = make_batch()
    with pytest.raises(ValueError, match="targets"):
        update_step(state, batch._replace(targets=batch.targets[:, :2]))
