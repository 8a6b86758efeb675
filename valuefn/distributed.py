"""The update step over a device mesh and over several hosts.

Everything here places arrays; the update step itself is unchanged. Under
``jax.jit`` the compiler propagates the input shardings through the step and
inserts the collectives (the gradient all-reduce over ``data``, the parameter
all-gathers and reduce-scatters over ``fsdp``), so there is no hand-written
communication.

The mesh has two axes:

- ``data``: the batch is split over it and parameters are replicated;
- ``fsdp``: the batch is split over it too, and each large parameter (and its
  optimizer moments) is split along its largest axis that the ``fsdp`` size
  divides (ZeRO-3 / fully sharded data parallel).

Several hosts: call :func:`initialize` first in every process, build the mesh
over all devices, and give :func:`shard_batch` each process's own rows.
"""

from __future__ import annotations

import os
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from valuefn._checks import check_count

BATCH_AXES = ("data", "fsdp")

T = TypeVar("T")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's multi-process runtime (``jax.distributed.initialize``).

    Arguments left as None are read from the environment variables
    ``VALUEFN_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``VALUEFN_NUM_PROCESSES`` and ``VALUEFN_PROCESS_ID``; if none are set either,
    JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU, Kubernetes).

    Args:
      coordinator_address: ``host:port`` that process 0 listens on.
      num_processes: number of processes in the job.
      process_id: this process's index in ``[0, num_processes)``.
    """
    env = os.environ
    if coordinator_address is None:
        coordinator_address = env.get("VALUEFN_COORDINATOR_ADDRESS")
    if num_processes is None and "VALUEFN_NUM_PROCESSES" in env:
        num_processes = _int_from_env("VALUEFN_NUM_PROCESSES")
    if process_id is None and "VALUEFN_PROCESS_ID" in env:
        process_id = _int_from_env("VALUEFN_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _int_from_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError as err:
        raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from err


def _axis_sizes(mesh: Mesh) -> tuple[int, int]:
    """The sizes of ``mesh``'s ``data`` and ``fsdp`` axes (a ValueError if it lacks one)."""
    if not all(name in mesh.shape for name in BATCH_AXES):
        raise ValueError(
            f"mesh must have the axes {BATCH_AXES} (see make_mesh), got {tuple(mesh.shape)}"
        )
    return mesh.shape["data"], mesh.shape["fsdp"]


def make_mesh(data: int | None = None, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp")`` over the available devices.

    Args:
      data: size of the ``data`` axis; by default all devices not used by ``fsdp``.
      fsdp: size of the ``fsdp`` axis (1: parameters replicated everywhere).
      devices: devices to use, ``jax.devices()`` (every process's) by default.

    Returns:
      A mesh of shape ``(data, fsdp)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct devices, at least one, got {devices!r}")
    fsdp = check_count("fsdp", fsdp)
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    data = check_count("data", data)
    if data * fsdp > len(devices):
        raise ValueError(
            f"mesh (data={data}, fsdp={fsdp}) needs {data * fsdp} devices, "
            f"only {len(devices)} are available"
        )
    return jax.make_mesh(
        (data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * fsdp]
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every device of the mesh (``data`` x ``fsdp``)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: T, mesh: Mesh) -> T:
    """Places every array of ``batch`` with its leading axis split over the mesh.

    In a single-process run ``batch`` holds the global batch. In a multi-process
    run each process passes its own rows, ``global rows / process_count`` of
    them, and the global array is assembled with
    ``jax.make_array_from_process_local_data``.

    Args:
      batch: a pytree (e.g. :class:`valuefn.Batch`) of arrays sharing their
        leading (batch) axis; None leaves stay None.
      mesh: from :func:`make_mesh`.

    Returns:
      The same pytree of global ``jax.Array`` s.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays to shard")
    rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(rows) != 1 or None in rows:
        shapes = [np.shape(leaf) for leaf in leaves]
        raise ValueError(f"batch arrays must share a leading batch axis, got shapes {shapes}")
    global_rows = rows.pop() * jax.process_count()
    data, fsdp = _axis_sizes(mesh)
    if global_rows % (data * fsdp):
        raise ValueError(
            f"batch size {global_rows} does not divide over the mesh's data axis "
            f"(data={data} x fsdp={fsdp} = {data * fsdp} shards)"
        )
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), batch
    )


def parameter_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """``fsdp`` on the largest axis it divides, for arrays of at least ``min_size``."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])
    # No trailing Nones: jit gives its outputs the shortest spec, and a state
    # placed with a longer one would miss the compiled step's cache once.
    return PartitionSpec(*[None] * axis, "fsdp")


def state_shardings(state: T, mesh: Mesh, *, min_size: int = 1024) -> T:
    """The sharding :func:`shard_state` gives each array of ``state``."""
    _, fsdp = _axis_sizes(mesh)
    check_count("min_size", min_size)
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, parameter_spec(np.shape(leaf), fsdp, min_size)), state
    )


def shard_state(state: T, mesh: Mesh, *, min_size: int = 1024) -> T:
    """Places a train state on the mesh: replicated over ``data``, split over ``fsdp``.

    Every array of at least ``min_size`` elements (parameters and the optimizer
    moments that mirror them) is split along its largest axis that the ``fsdp``
    size divides; smaller arrays and scalars are replicated. Every process must
    pass the same ``state`` (same seed).

    Args:
      state: a pytree of arrays, e.g. the ``TrainState`` of
        :func:`valuefn.init_train_state`.
      mesh: from :func:`make_mesh`.
      min_size: arrays smaller than this stay replicated.

    Returns:
      The same pytree of global ``jax.Array`` s.
    """
    shardings = state_shardings(state, mesh, min_size=min_size)
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)

    def place(leaf, sharding):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, state, shardings)
