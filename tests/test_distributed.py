"""The update step on a device mesh and across processes equals one device.

The meshes need 8 CPU devices and the multi-process run needs
``jax.distributed``; both run in subprocesses (tests/distributed_worker.py) so
that the rest of the suite keeps its single device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from valuefn import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
# Parameters after the worker's three Adam steps of 1e-2. Adam divides each gradient by
# its running root mean square, so where a gradient is near 0 its float-level
# differences between one device and a mesh reach 1.8e-5 in the parameters
# (jaxlib 0.9.0); an error in the sharding moves them by up to 3e-2.
TOLERANCE = 5e-5


def run_worker(*args, devices=1):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Beside the tests' own XLA flags (conftest.py), which cut the compiles that take
    # most of the workers' time; the comparisons hold with the default flags too.
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    )
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def params_of(results, tag):
    prefix = f"{tag}/"
    return {k[len(prefix) :]: results[k] for k in results.files if k.startswith(prefix)}


def assert_same_params(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(
            actual[name], expected[name], atol=TOLERANCE, rtol=0, err_msg=name
        )


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "mesh.npz"
    wait(run_worker("mesh", path, devices=8))
    return np.load(path)


@pytest.mark.parametrize("shape", ["8x1", "4x2", "1x8"])
def test_sharded_updates_equal_single_device(mesh_results, shape):
    single = params_of(mesh_results, "single")
    assert single, "the worker recorded no parameters"
    assert_same_params(params_of(mesh_results, shape), single)


@pytest.mark.parametrize("shape", ["8x1", "4x2", "1x8"])
def test_sharded_epochs_equal_single_device(mesh_results, shape):
    assert_same_params(
        params_of(mesh_results, f"{shape}_epochs"), params_of(mesh_results, "single_epochs")
    )


@pytest.mark.parametrize("shape", ["8x1", "4x2", "1x8"])
def test_return_normalizer_statistics_are_global(mesh_results, shape):
    single = params_of(mesh_results, "normalized/single")
    assert single["stats_count"] > 0
    assert_same_params(params_of(mesh_results, f"normalized/{shape}"), single)


@pytest.mark.parametrize("shape", ["8x1", "4x2", "1x8"])
def test_sharded_scanned_transformer_equals_single_device(mesh_results, shape):
    single = params_of(mesh_results, "scanned/single")
    assert any("blocks" in name for name in single)
    assert_same_params(params_of(mesh_results, f"scanned/{shape}"), single)


def test_fsdp_shards_the_stacked_blocks_of_a_scanned_transformer(mesh_results):
    sharded = list(mesh_results["scanned/sharded_params/1x8"])
    assert any("blocks" in name and "fc" in name for name in sharded)
    assert len(mesh_results["scanned/sharded_params/8x1"]) == 0


@pytest.mark.parametrize("shape", ["8x1", "4x2", "1x8"])
def test_sharded_update_step_compiles_once_for_its_repeated_steps(mesh_results, shape):
    # The state the step returns must carry the shardings shard_state gave it.
    assert int(mesh_results[f"compiles/{shape}"]) == 1


def test_fsdp_really_shards_parameters(mesh_results):
    assert len(mesh_results["sharded_params/8x1"]) == 0
    assert len(mesh_results["sharded_params/4x2"]) > 0
    assert len(mesh_results["sharded_params/1x8"]) > 0


def test_batch_not_dividing_data_axis_raises(mesh_results):
    message = str(mesh_results["divide_error"])
    assert "batch size 12" in message and "data" in message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process_with_whole_batch(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    outputs = [tmp_path / f"process{i}.npz" for i in range(2)]
    workers = [run_worker("process", out, address, 2, i) for i, out in enumerate(outputs)]
    single = run_worker("single", tmp_path / "single.npz")
    for worker in [*workers, single]:
        wait(worker)
    expected = dict(np.load(tmp_path / "single.npz"))
    for out in outputs:
        assert_same_params(dict(np.load(out)), expected)


def test_mesh_larger_than_devices_raises():
    with pytest.raises(ValueError, match="devices"):
        distributed.make_mesh(jax.device_count() + 1)


def test_bad_mesh_arguments_raise_value_errors_naming_them(monkeypatch):
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="devices"):
        distributed.make_mesh(devices=[])
    with pytest.raises(ValueError, match="devices"):
        distributed.make_mesh(2, devices=[device, device])
    assert distributed.make_mesh(np.int64(1), devices=[device]).shape["data"] == 1
    other = jax.make_mesh((1,), ("batch",), devices=[device])
    with pytest.raises(ValueError, match="mesh must have the axes"):
        distributed.shard_batch(np.zeros((2, 3)), other)
    with pytest.raises(ValueError, match="min_size"):
        distributed.shard_state({"w": np.zeros(4)}, distributed.make_mesh(), min_size=None)
    monkeypatch.setenv("VALUEFN_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="VALUEFN_NUM_PROCESSES"):
        distributed.initialize()


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((64, 32), ("fsdp",)),
        ((6, 64), (None, "fsdp")),
        ((8, 64), (None, "fsdp")),  # the largest divisible axis, not the first
        ((8, 4), ("fsdp",)),  # exactly min_size elements
        ((7, 4), ()),  # fewer
        ((7, 9), ()),
        ((16,), ()),
    ],
)
def test_parameter_spec_picks_largest_divisible_axis(shape, spec):
    assert tuple(distributed.parameter_spec(shape, 4, min_size=32)) == spec
