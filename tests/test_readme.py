"""README.md's Python examples run as written and do what their comments say.

Every ```python block of README.md is read from the file at test time and run
with ``exec`` on small inputs bound to its free names; tracebacks point at
README.md's own lines. Block 1 (targets and loss) runs in this process. Block 3
(scaling out) needs two devices and the ``state``, ``batch`` and
``update_step`` of block 2, so blocks 2 and 3 run together in one subprocess
with two forced host CPU devices (this file run as a script), which keeps the
rest of the suite on one device. To keep its compiles short, the subprocess
builds block 2's critic narrower and with fewer layers than the README's
(``SMALL_CRITIC``, every other argument as written) and compiles with the
tests' XLA flags (``conftest.py``); both sides of each comparison run under
them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import valuefn

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
MARKERS = ("valuefn.gae(", "valuefn.TransformerValue(", "distributed.make_mesh(")
METRICS = {
    "value_loss",
    "explained_variance",
    "clip_fraction",
    "grad_norm",
    "value_mean",
    "target_mean",
    "skipped",
}
LENGTHS_1 = (12, 7, 4)  # block 1: rows of 12 steps
FEATURES = 4
LENGTHS_2 = (8, 5, 3, 8, 6, 1, 7, 4)  # block 2: 8 minibatches need a batch of 8k rows
VOCAB = 1024  # the README's vocab_size
DEVICES = 2
SMALL_CRITIC = {"d_model": 32, "num_layers": 1, "num_heads": 2}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def readme_blocks(path: Path = README) -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for each python block."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in FENCE.finditer(text)
    ]


def run_block(block: tuple[int, str], namespace: dict) -> dict:
    """Executes a README block in ``namespace`` with README.md's line numbers."""
    line, code = block
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    return namespace


def right_padded(lengths, steps: int) -> np.ndarray:
    """Float32 0/1 mask keeping the first ``lengths[b]`` steps of each row."""
    return (np.arange(steps) < np.asarray(lengths)[:, None]).astype(np.float32)


def linear_critic(params, obs):
    return obs @ params["w"] + params["b"]


def block1_inputs() -> dict:
    rng = np.random.default_rng(0)
    mask = right_padded(LENGTHS_1, max(LENGTHS_1))
    shape = mask.shape
    terminated = np.zeros(shape, bool)
    terminated[0, 5] = True  # an episode ends mid-row
    terminated[1, LENGTHS_1[1] - 1] = True  # and one on a row's last valid step
    return {
        "rewards": jnp.asarray(rng.normal(size=shape) * mask, jnp.float32),
        "values": jnp.asarray(rng.normal(size=shape) * mask, jnp.float32),
        "terminated": jnp.asarray(terminated),
        "mask": jnp.asarray(mask),
        "last_value": jnp.asarray(rng.normal(size=shape[0]), jnp.float32),
        "critic_apply": linear_critic,
        "params": {
            "w": jnp.asarray(rng.normal(size=FEATURES), jnp.float32),
            "b": jnp.asarray(0.1, jnp.float32),
        },
        "obs": jnp.asarray(rng.normal(size=(*shape, FEATURES)), jnp.float32),
    }


def block2_inputs() -> dict:
    rng = np.random.default_rng(1)
    mask = right_padded(LENGTHS_2, max(LENGTHS_2))
    shape = mask.shape
    return {
        "tokens": (rng.integers(1, VOCAB, shape) * mask).astype(np.int32),
        "returns": (rng.normal(size=shape) * mask).astype(np.float32),
        "mask": mask,
        "values": (0.1 * rng.normal(size=shape) * mask).astype(np.float32),
    }


def describe(array) -> dict:
    array = np.asarray(array)
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "finite": bool(np.isfinite(array).all()),
        "max_abs": float(np.abs(array).max()),
    }


def host_metrics(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def shard_layout(array) -> dict:
    """The global shape and each device's shard shape (one whole shard off the devices)."""
    shards = getattr(array, "addressable_shards", None)
    return {
        "shape": list(np.shape(array)),
        "shards": [list(np.shape(s.data)) for s in shards] if shards else [list(np.shape(array))],
    }


def leaves_by_name(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def run_blocks_2_and_3(out: Path) -> None:
    """Runs README blocks 2 and 3 and writes what the tests check to ``out`` (JSON).

    Block 2's results are written before block 3 runs, so that a failure in
    block 3 does not hide them. Between the blocks, the unsharded reference
    step (``update_step`` on a copy of block 2's ``state``) is taken and its
    donation and compilation cache are probed on copies, leaving the
    namespace that block 3 receives as block 2 left it.
    """
    readme_critic = valuefn.TransformerValue

    def small_critic(*args, **kwargs):
        return readme_critic(*args, **{**kwargs, **SMALL_CRITIC})

    valuefn.TransformerValue = small_critic  # this process runs only blocks 2 and 3
    blocks = readme_blocks()
    namespace = run_block(blocks[1], block2_inputs())
    graphdef, state, tokens = namespace["graphdef"], namespace["state"], namespace["tokens"]
    update_step, batch = namespace["update_step"], namespace["batch"]
    # Placed like state.params, so that predict reuses block 2's executable.
    initial_params = jax.tree.map(
        lambda initial, trained: jax.device_put(initial, trained.sharding),
        nnx.to_pure_dict(nnx.state(namespace["critic"], nnx.Param)),
        state.params,
    )
    initial_jaxpr = jax.make_jaxpr(valuefn.predict, static_argnums=0)
    params = leaves_by_name(state.params)
    results = {
        "block2": {
            "initial_values": describe(valuefn.predict(graphdef, initial_params, tokens)),
            "body_uses_bf16": "bf16" in str(initial_jaxpr(graphdef, initial_params, tokens)),
            "param_dtypes": sorted({str(leaf.dtype) for leaf in params.values()}),
            "head_dtypes": sorted({str(v.dtype) for k, v in params.items() if "head" in k}),
            "step": int(state.step),
            "metrics": host_metrics(namespace["metrics"]),
            "values": describe(namespace["values"]),
        }
    }
    out.write_text(json.dumps(results))

    probe = jax.tree.map(jnp.copy, state)
    reference_state, reference_metrics = update_step(probe, batch)
    reference_params = {k: np.asarray(v) for k, v in leaves_by_name(reference_state.params).items()}
    update_step(reference_state, batch)
    results["block2"].update(
        donated=all(leaf.is_deleted() for leaf in jax.tree.leaves(probe)),
        cache_size=update_step._cache_size(),
    )
    out.write_text(json.dumps(results))

    run_block(blocks[2], namespace)
    mesh, state = namespace["mesh"], namespace["state"]
    sharded_params = leaves_by_name(state.params)
    results["block3"] = {
        "device_count": jax.device_count(),
        "mesh_axes": list(mesh.axis_names),
        "mesh_shape": [int(size) for size in mesh.devices.shape],
        "batch": {k: shard_layout(v) for k, v in leaves_by_name(namespace["batch"]).items()},
        "params": {k: shard_layout(v) for k, v in sharded_params.items()},
        "metrics": host_metrics(namespace["metrics"]),
        "reference_metrics": host_metrics(reference_metrics),
        "max_param_difference": max(
            float(np.abs(np.asarray(sharded_params[k]) - v).max())
            for k, v in reference_params.items()
        ),
    }
    out.write_text(json.dumps(results))


# Block order and coverage.


def test_readme_python_blocks_are_the_three_tested_here():
    """Each python block of README.md has inputs in this file; a new one needs them too."""
    blocks = readme_blocks()
    assert len(blocks) == len(MARKERS), [code.splitlines()[0] for _, code in blocks]
    for (_, code), marker in zip(blocks, MARKERS, strict=True):
        assert marker in code


# Block 1: targets and the value loss.


@pytest.fixture(scope="module")
def block1():
    inputs = block1_inputs()
    return inputs, run_block(readme_blocks()[0], dict(inputs))


def test_block1_gae_is_float32_batch_by_time_and_zero_on_masked_steps(block1):
    """advantages and returns are the float32 [B, T] GAE of the inputs, 0 where masked."""
    inputs, namespace = block1
    mask = np.asarray(inputs["mask"])
    gamma_t = np.where(np.asarray(inputs["terminated"]), 0.0, 0.99).astype(np.float32)
    np.testing.assert_array_equal(namespace["gamma_t"], gamma_t)
    args = (inputs["rewards"], inputs["values"], gamma_t, inputs["last_value"], 0.95)
    expected = {
        "advantages": ref.gae_advantages(*args, mask=mask),
        "returns": ref.lambda_returns(*args, mask=mask),
    }
    for name, want in expected.items():
        got = namespace[name]
        assert got.shape == mask.shape and got.dtype == jnp.float32, name
        assert np.all(np.asarray(got)[mask == 0] == 0), name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_block1_targets_carry_no_gradient(block1):
    """Run under jax.grad, the block's advantages and returns do not depend on
    rewards or values: they are constants to the loss (the semi-gradient)."""
    inputs, _ = block1

    def targets_sum(rewards, values):
        namespace = run_block(readme_blocks()[0], {**inputs, "rewards": rewards, "values": values})
        return jnp.sum(namespace["advantages"]) + jnp.sum(namespace["returns"])

    grads = jax.grad(targets_sum, argnums=(0, 1))(inputs["rewards"], inputs["values"])
    for grad in grads:
        np.testing.assert_array_equal(grad, np.zeros(inputs["mask"].shape, np.float32))


def test_block1_loss_is_the_clipped_value_loss_and_grads_match_params(block1):
    """loss_fn is the finite PPO-clipped masked loss on the block's returns, and
    grads is a finite, non-zero tree shaped like params."""
    inputs, namespace = block1
    params = inputs["params"]
    loss = namespace["loss_fn"](params, inputs["obs"])
    assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(loss)
    expected = ref.value_loss(
        linear_critic(params, inputs["obs"]),
        namespace["returns"],
        mask=inputs["mask"],
        old_values=inputs["values"],
        clip_epsilon=0.2,
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    grads = namespace["grads"]
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for grad, param in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert grad.shape == param.shape and grad.dtype == param.dtype
        assert np.isfinite(grad).all()
    assert any(np.any(grad != 0) for grad in jax.tree.leaves(grads))


# Blocks 2 and 3: the critic, the update steps and the mesh, in a subprocess.


def check_critic_starts_at_zero_with_a_bf16_body_and_float32_head(block2, block3):
    """The untrained critic maps tokens [B, T] to float32 zeros [B, T]; its body
    computes in bf16 while every parameter, the head's included, is float32."""
    initial = block2["initial_values"]
    assert initial["shape"] == [len(LENGTHS_2), max(LENGTHS_2)], initial
    assert initial["dtype"] == "float32" and initial["max_abs"] == 0, initial
    assert block2["body_uses_bf16"]
    assert block2["param_dtypes"] == ["float32"], block2["param_dtypes"]
    assert block2["head_dtypes"] == ["float32"], block2["head_dtypes"]


def check_update_and_epochs_steps_train_with_finite_metrics(block2, block3):
    """One update_step plus 4 epochs of 8 minibatches apply 33 updates and report
    the README's metrics, all finite, none skipped."""
    assert block2["step"] == 1 + 4 * 8, block2["step"]
    metrics = block2["metrics"]
    assert set(metrics) == METRICS, sorted(metrics)
    assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert metrics["skipped"] == 0 and metrics["value_loss"] > 0, metrics


def check_update_step_donates_state_and_compiles_once(block2, block3):
    """update_step consumes the state passed in, and its output state reuses the
    executable compiled for the first call (one compilation per shape)."""
    assert block2["donated"]
    assert block2["cache_size"] == 1, block2["cache_size"]


def check_predict_gives_float32_values_of_the_trained_critic(block2, block3):
    """predict returns finite float32 [B, T] values, no longer the initial zeros."""
    values = block2["values"]
    assert values["shape"] == [len(LENGTHS_2), max(LENGTHS_2)], values
    assert values["dtype"] == "float32" and values["finite"], values
    assert values["max_abs"] > 0, values


def check_mesh_spans_all_devices_and_splits_the_batch(block2, block3):
    """The mesh has axes (data, fsdp) over both devices, and every batch array
    is split along its leading axis, half the rows on each device."""
    assert block3["device_count"] == DEVICES
    assert block3["mesh_axes"] == ["data", "fsdp"], block3["mesh_axes"]
    assert block3["mesh_shape"] == [1, DEVICES], block3["mesh_shape"]
    assert set(block3["batch"]) == {".inputs", ".targets", ".mask", ".old_values"}
    for name, layout in block3["batch"].items():
        rows, *rest = layout["shape"]
        assert layout["shards"] == [[rows // DEVICES, *rest]] * DEVICES, (name, layout)


def check_large_parameters_are_split_over_fsdp(block2, block3):
    """The largest parameter is split in two halves over the devices, as is every
    split one; the smallest, and the head, are replicated."""
    params = block3["params"]
    size = {name: int(np.prod(layout["shape"])) for name, layout in params.items()}
    split = {name for name, layout in params.items() if layout["shards"][0] != layout["shape"]}
    assert max(size, key=size.get) in split, sorted(split)
    for name in split:
        shards = params[name]["shards"]
        assert [int(np.prod(shard)) for shard in shards] == [size[name] // DEVICES] * DEVICES
    assert min(size, key=size.get) not in split
    assert not any("head" in name for name in split), sorted(split)


def check_sharded_step_gives_the_same_numbers_as_one_device(block2, block3):
    """update_step on the sharded state and batch reports the metrics, and
    reaches the parameters, of the same step on one device."""
    sharded, single = block3["metrics"], block3["reference_metrics"]
    assert set(sharded) == set(single) == METRICS, (sorted(sharded), sorted(single))
    for name in sorted(METRICS):
        np.testing.assert_allclose(sharded[name], single[name], **TOLERANCE, err_msg=name)
    assert block3["max_param_difference"] < 1e-5, block3["max_param_difference"]


BLOCK_2_AND_3_CHECKS = (
    check_critic_starts_at_zero_with_a_bf16_body_and_float32_head,
    check_update_and_epochs_steps_train_with_finite_metrics,
    check_update_step_donates_state_and_compiles_once,
    check_predict_gives_float32_values_of_the_trained_critic,
    check_mesh_spans_all_devices_and_splits_the_batch,
    check_large_parameters_are_split_over_fsdp,
    check_sharded_step_gives_the_same_numbers_as_one_device,
)


def test_blocks_2_and_3_on_two_devices_do_what_their_comments_say(tmp_path):
    """Blocks 2 and 3 run in one subprocess on two CPU devices and pass every
    check_* claim above; all failing claims are reported together.

    One test owns the subprocess (about half a minute of compiling the README's
    critic), so that pytest-xdist never runs it twice.
    """
    out = tmp_path / "results.json"
    # Beside the tests' own XLA flags (conftest.py).
    flags = f"--xla_force_host_platform_device_count={DEVICES}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
    }
    process = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    output = process.stdout + process.stderr
    results = json.loads(out.read_text()) if out.exists() else {}
    assert "block2" in results, f"README block 2 failed:\n{output}"
    failures = []
    if process.returncode != 0:
        failures.append(f"the run stopped with exit code {process.returncode}:\n{output}")
    for check in BLOCK_2_AND_3_CHECKS:
        try:
            check(results["block2"], results.get("block3"))
        except (AssertionError, KeyError, TypeError) as error:
            failures.append(f"{check.__name__}: {check.__doc__}\n  {type(error).__name__}: {error}")
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":
    run_blocks_2_and_3(Path(sys.argv[1]))
