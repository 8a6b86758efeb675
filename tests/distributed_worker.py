"""Runs the update step on a mesh or in one process of a multi-process job.

Started by tests/test_distributed.py in subprocesses, so that the device count
(``XLA_FLAGS``) and ``jax.distributed`` state never leak into the rest of the
suite. Writes its results as ``.npz`` files.

  python tests/distributed_worker.py mesh OUT.npz
  python tests/distributed_worker.py process OUT.npz ADDRESS NUM_PROCESSES PROCESS_ID
  python tests/distributed_worker.py single OUT.npz
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax
from flax import nnx

import valuefn
from valuefn import distributed

ROWS, STEPS, FEATURES = 16, 8, 6
NUM_UPDATES = 3
MESH_SHAPES = ((8, 1), (4, 2), (1, 8))
MIN_SHARD_SIZE = 256


def make_problem():
    """A small critic, its optimizer and one batch, identical in every process."""
    model = valuefn.MLPValue(FEATURES, (64, 64), rngs=nnx.Rngs(0))
    optimizer = optax.adam(1e-2)
    rng = np.random.default_rng(1)
    batch = valuefn.Batch(
        inputs=rng.normal(size=(ROWS, STEPS, FEATURES)).astype(np.float32),
        targets=rng.normal(size=(ROWS, STEPS)).astype(np.float32),
        mask=(rng.random((ROWS, STEPS)) > 0.2).astype(np.float32),
        old_values=0.1 * rng.normal(size=(ROWS, STEPS)).astype(np.float32),
    )
    return model, optimizer, batch


def host_copy(tree):
    return jax.tree.map(np.asarray, tree)


def flat_params(state) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state.params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def normalizer_results(tag: str, state) -> dict[str, np.ndarray]:
    """The return statistics and parameters of a run with the return normaliser."""
    stats = {
        f"normalized/{tag}/stats_{k}": np.asarray(v)
        for k, v in state.return_stats._asdict().items()
    }
    params = {f"normalized/{tag}/{k}": v for k, v in flat_params(state).items()}
    return {**stats, **params}


def run_updates(update_step, state, batch):
    metrics = None
    for _ in range(NUM_UPDATES):
        state, metrics = update_step(state, batch)
    return state, metrics


def updates_on_meshes(update_step, initial, batch, prefix: str = "") -> dict[str, np.ndarray]:
    """The parameters after :func:`run_updates` from ``initial`` on one device
    (``{prefix}single/NAME``) and on each of ``MESH_SHAPES`` (``{prefix}DxF/NAME``),
    and the names of the parameters FSDP splits there (``{prefix}sharded_params/DxF``)."""
    single, _ = run_updates(update_step, jax.device_put(initial), jax.device_put(batch))
    results = {f"{prefix}single/{k}": v for k, v in flat_params(single).items()}
    for data, fsdp in MESH_SHAPES:
        mesh = distributed.make_mesh(data, fsdp)
        shape = f"{data}x{fsdp}"
        state = distributed.shard_state(initial, mesh, min_size=MIN_SHARD_SIZE)
        sharded = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
            if "fsdp" in tuple(leaf.sharding.spec)
        ]
        results[f"{prefix}sharded_params/{shape}"] = np.array(sharded, dtype=str)
        compiled = update_step._cache_size()
        state, _ = run_updates(update_step, state, distributed.shard_batch(batch, mesh))
        results[f"{prefix}compiles/{shape}"] = np.array(update_step._cache_size() - compiled)
        results.update({f"{prefix}{shape}/{k}": v for k, v in flat_params(state).items()})
    return results


def run_epochs(graphdef, optimizer, state, batch):
    epochs_step = valuefn.make_epochs_step(
        graphdef, optimizer, num_epochs=2, num_minibatches=2, clip_epsilon=0.2
    )
    state, _ = epochs_step(state, batch, jax.random.key(3))
    return state


def mesh_results(path: str) -> None:
    model, optimizer, batch = make_problem()
    graphdef, state = valuefn.init_train_state(model, optimizer)
    initial = host_copy(state)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    results = updates_on_meshes(update_step, initial, batch)
    single_epochs = run_epochs(graphdef, optimizer, jax.device_put(initial), batch)
    for name, value in flat_params(single_epochs).items():
        results[f"single_epochs/{name}"] = value
    normalized_step = valuefn.make_update_step(
        graphdef, optimizer, normalizer=valuefn.ReturnNormalizer(), clip_epsilon=0.2
    )
    single_normalized, _ = run_updates(
        normalized_step, jax.device_put(initial), jax.device_put(batch)
    )
    results.update(normalizer_results("single", single_normalized))

    for data, fsdp in MESH_SHAPES:
        mesh = distributed.make_mesh(data, fsdp)
        tag = f"{data}x{fsdp}"
        state = distributed.shard_state(initial, mesh, min_size=MIN_SHARD_SIZE)
        state, _ = run_updates(normalized_step, state, distributed.shard_batch(batch, mesh))
        results.update(normalizer_results(tag, state))
        state = distributed.shard_state(initial, mesh, min_size=MIN_SHARD_SIZE)
        state = run_epochs(graphdef, optimizer, state, distributed.shard_batch(batch, mesh))
        for name, value in flat_params(state).items():
            results[f"{tag}_epochs/{name}"] = value
    results.update(scanned_transformer_results())
    try:
        distributed.shard_batch(jax.tree.map(lambda x: x[:12], batch), distributed.make_mesh(8, 1))
        results["divide_error"] = np.array("no error")
    except ValueError as err:
        results["divide_error"] = np.array(str(err))
    np.savez(path, **results)


def scanned_transformer_results() -> dict[str, np.ndarray]:
    """A transformer critic with stacked, scanned blocks: updates on one device and
    on each mesh, and which of its parameters FSDP shards."""
    model = valuefn.TransformerValue(
        16,
        d_model=16,
        num_layers=2,
        num_heads=2,
        max_len=STEPS,
        scan_layers=True,
        rngs=nnx.Rngs(0),
    )
    optimizer = optax.adam(1e-2)
    _, _, batch = make_problem()
    tokens = np.random.default_rng(2).integers(0, 16, (ROWS, STEPS)).astype(np.int32)
    batch = batch._replace(inputs=tokens)
    graphdef, state = valuefn.init_train_state(model, optimizer)
    initial = host_copy(state)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    return updates_on_meshes(update_step, initial, batch, prefix="scanned/")


def process_results(path: str, address: str, num_processes: int, process_id: int) -> None:
    distributed.initialize(address, num_processes, process_id)
    model, optimizer, batch = make_problem()
    graphdef, state = valuefn.init_train_state(model, optimizer)
    mesh = distributed.make_mesh()
    rows = ROWS // num_processes
    local = jax.tree.map(lambda x: x[process_id * rows : (process_id + 1) * rows], batch)
    state = distributed.shard_state(host_copy(state), mesh)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    state, _ = run_updates(update_step, state, distributed.shard_batch(local, mesh))
    replicated = jax.tree.map(lambda leaf: np.asarray(leaf.addressable_data(0)), state)
    np.savez(path, **flat_params(replicated))
    jax.distributed.shutdown()


def single_results(path: str) -> None:
    model, optimizer, batch = make_problem()
    graphdef, state = valuefn.init_train_state(model, optimizer)
    update_step = valuefn.make_update_step(graphdef, optimizer, clip_epsilon=0.2)
    state, _ = run_updates(update_step, state, jax.device_put(batch))
    np.savez(path, **flat_params(state))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "mesh":
        mesh_results(out)
    elif mode == "process":
        process_results(out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "single":
        single_results(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
