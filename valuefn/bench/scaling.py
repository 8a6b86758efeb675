"""Weak scaling of the update step over 1, 2, 4 and 8 devices.

The per-device batch is fixed, so ideal scaling keeps the step time constant:
each figure's baseline is the step on one device, and its ratio is the
efficiency, ``(tokens/s on n devices) / (n x tokens/s on one)``.

On a CPU the benchmark runs in a child process that asks XLA for 8 host
devices (``--xla_force_host_platform_device_count``, read only when JAX starts),
so that the rest of the suite keeps its one device. The 8 devices share the
machine's cores: there the figures show the overhead of sharding, not a
speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

from valuefn import distributed
from valuefn.bench import problem
from valuefn.bench.figures import Figure, measure, timed

PER_DEVICE_BATCH, SEQ_LEN = 2, 128
HOST_DEVICES = 8


def run(quick: bool) -> list[Figure]:
    """Weak scaling over 1, 2, 4 and 8 devices, in a child process on a CPU (``quick``: 1 and 2)."""
    if jax.default_backend() == "cpu" and jax.device_count() < HOST_DEVICES:
        return _run_in_child(quick)
    return _run_here(quick)


def _run_in_child(quick: bool) -> list[Figure]:
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_force_host_platform_device_count={HOST_DEVICES}"
    command = [sys.executable, "-m", "valuefn.bench.scaling", *(["--quick"] if quick else [])]
    child = subprocess.run(
        command, env={**os.environ, "XLA_FLAGS": flags.strip()}, capture_output=True, text=True
    )
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{child.stderr[-2000:]}")
    return [Figure(**record) for record in json.loads(child.stdout)]


def _run_here(quick: bool) -> list[Figure]:
    spec = problem.TINY if quick else problem.REFERENCE
    rows, seq_len = (1, 16) if quick else (PER_DEVICE_BATCH, SEQ_LEN)
    repeats = 3 if quick else 5
    graphdef, optimizer, host_state = problem.make_problem(spec, seq_len)
    update_step = problem.make_update_step(graphdef, optimizer)
    figures, one_device = [], None
    for n in (1, 2) if quick else (1, 2, 4, 8):
        if n > jax.device_count():
            break
        mesh = distributed.make_mesh(n, 1, devices=jax.devices()[:n])
        batch = distributed.shard_batch(problem.make_batch(n * rows, seq_len, spec.vocab), mesh)
        carry = {"state": distributed.shard_state(host_state, mesh)}

        def step(carry=carry, batch=batch):
            # The step donates its state: keep the newest.
            carry["state"], metrics = update_step(carry["state"], batch)
            return metrics

        timing = measure(step, repeats=repeats)
        one_device = one_device or timing
        figures.append(
            timed(
                f"scaling update step {n} device(s) x {rows}x{seq_len}",
                timing,
                against=("1 device (ideal weak scaling)", one_device),
                **problem.step_work(spec, n * rows, seq_len),
            )
        )
    return figures


if __name__ == "__main__":
    # The child process of _run_in_child: the figures as JSON on stdout.
    figures = _run_here(quick="--quick" in sys.argv[1:])
    print(json.dumps([figure._asdict() for figure in figures]))
