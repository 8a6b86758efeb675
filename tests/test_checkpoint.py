"""Orbax checkpoints of a TrainState: exact round trip and bit-identical resume."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import valuefn
from valuefn import checkpoint

ROWS, STEPS = 4, 8
VOCAB = 32


def make_problem(seed=0, transformer=False):
    if transformer:
        model = valuefn.TransformerValue(
            VOCAB, d_model=16, num_layers=1, num_heads=2, max_len=STEPS, rngs=nnx.Rngs(seed)
        )
    else:
        model = valuefn.MLPValue(STEPS, (16,), rngs=nnx.Rngs(seed))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    graphdef, state = valuefn.init_train_state(model, optimizer)
    return graphdef, optimizer, state


def batches(count):
    """Batches for the MLP critic: features ``[B, T, F]``, targets ``[B, T]``."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        yield valuefn.Batch(
            inputs=rng.normal(size=(ROWS, STEPS, STEPS)).astype(np.float32),
            targets=(5.0 + 2.0 * rng.normal(size=(ROWS, STEPS))).astype(np.float32),
            mask=(rng.random((ROWS, STEPS)) > 0.1).astype(np.float32),
            old_values=rng.normal(size=(ROWS, STEPS)).astype(np.float32),
        )


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)

    def same(x, y):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y, strict=True)

    jax.tree.map(same, host(a), host(b))


def test_round_trip_restores_every_array_exactly(tmp_path):
    graphdef, optimizer, state = make_problem()
    update_step = valuefn.make_update_step(
        graphdef, optimizer, clip_epsilon=0.2, normalizer=valuefn.ReturnNormalizer()
    )
    for batch in batches(2):
        state, _ = update_step(state, batch)
    saved = host(state)
    written = checkpoint.save(tmp_path / "ckpt", state, step=2)
    assert written == (tmp_path / "ckpt").resolve()
    _, _, fresh = make_problem(seed=1)
    restored, step = checkpoint.restore(tmp_path / "ckpt", fresh)
    assert step == 2
    assert isinstance(restored, valuefn.TrainState)
    assert type(restored.opt_state[1][0]) is type(state.opt_state[1][0])
    assert_identical(restored, saved)
    # The saved state stays usable.
    assert_identical(state, saved)


def test_round_trip_of_a_transformer_state(tmp_path):
    _, _, state = make_problem(transformer=True)
    checkpoint.save(tmp_path, state, step=0)
    _, _, fresh = make_problem(seed=1, transformer=True)
    restored, _ = checkpoint.restore(tmp_path, fresh)
    assert_identical(restored, state)


def test_resumed_training_continues_bit_identically(tmp_path):
    graphdef, optimizer, state = make_problem()
    update_step = valuefn.make_update_step(
        graphdef, optimizer, clip_epsilon=0.2, normalizer=valuefn.ReturnNormalizer()
    )
    epochs_step = valuefn.make_epochs_step(
        graphdef,
        optimizer,
        num_epochs=2,
        num_minibatches=2,
        clip_epsilon=0.2,
        normalizer=valuefn.ReturnNormalizer(),
    )
    first, second, third = batches(3)
    state, _ = update_step(state, first)
    checkpoint.save(tmp_path, state, step=1)

    def continue_training(state):
        state, _ = update_step(state, second)
        state, metrics = epochs_step(state, third, jax.random.key(4))
        return host(state), host(metrics)

    straight, straight_metrics = continue_training(state)
    _, _, fresh = make_problem(seed=1)
    resumed_state, step = checkpoint.restore(tmp_path, fresh)
    resumed, resumed_metrics = continue_training(resumed_state)
    assert step == 1
    assert_identical(resumed, straight)
    assert_identical(resumed_metrics, straight_metrics)


def test_latest_step_and_max_to_keep(tmp_path):
    graphdef, optimizer, state = make_problem()
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    assert checkpoint.latest_step(tmp_path / "none") is None
    saved = {}
    for step, batch in enumerate(batches(4), start=1):
        state, _ = update_step(state, batch)
        checkpoint.save(tmp_path, state, step, max_to_keep=2)
        saved[step] = host(state)
    assert checkpoint.latest_step(tmp_path) == 4
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 4]
    _, _, fresh = make_problem()
    latest, step = checkpoint.restore(tmp_path, fresh)
    assert step == 4
    assert_identical(latest, saved[4])
    earlier, step = checkpoint.restore(tmp_path, fresh, step=3)
    assert step == 3
    assert_identical(earlier, saved[3])
    # Saving below a later checkpoint would leave that one the latest: refused,
    # with nothing deleted.
    with pytest.raises(ValueError, match=r"step 3 is below the checkpoints \[4\]"):
        checkpoint.save(tmp_path, fresh, 3)
    assert_identical(checkpoint.restore(tmp_path, fresh, step=3)[0], saved[3])
    # Saving a step again replaces it.
    checkpoint.save(tmp_path, fresh, 4)
    again, _ = checkpoint.restore(tmp_path, fresh)
    assert_identical(again, fresh)


def test_restore_into_abstract_target(tmp_path):
    _, _, state = make_problem()
    checkpoint.save(tmp_path, state, 0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = checkpoint.restore(tmp_path, abstract)
    assert_identical(restored, state)


def test_bad_arguments_raise_value_error_naming_them(tmp_path):
    _, _, state = make_problem()
    with pytest.raises(ValueError, match="state"):
        checkpoint.save(tmp_path, state.params, 0)
    with pytest.raises(ValueError, match="step"):
        checkpoint.save(tmp_path, state, -1)
    with pytest.raises(ValueError, match="directory"):
        checkpoint.restore(tmp_path / "missing", state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "empty", state)
    checkpoint.save(tmp_path / "one", state, 5)
    with pytest.raises(ValueError, match="step 6"):
        checkpoint.restore(tmp_path / "one", state, step=6)
    with pytest.raises(ValueError, match="target"):
        checkpoint.restore(tmp_path / "one", state.params)


def test_restore_into_another_model_names_the_checkpoint_and_target(tmp_path):
    _, _, state = make_problem()
    checkpoint.save(tmp_path / "one", state, 5)
    # Another width: the leaves whose shapes differ are named, with both shapes.
    # Another number of layers: the leaves only one side has.
    for sizes, leaf in (
        (
            (32,),
            r"params/layers/0/kernel is \(\d+, \d+\) in the checkpoint and \(\d+, 32\) in target",
        ),
        ((16, 16), r"not in the checkpoint: [^;]*params/layers/1/"),
    ):
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
        _, other = valuefn.init_train_state(
            valuefn.MLPValue(STEPS, sizes, rngs=nnx.Rngs(0)), optimizer
        )
        with pytest.raises(ValueError, match=r"step 5 in .* does not fit target") as raised:
            checkpoint.restore(tmp_path / "one", other)
        assert re.search(leaf, str(raised.value)), str(raised.value)
