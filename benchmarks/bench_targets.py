"""GAE and lambda-return kernels: scan against associative, NumPy and PyTorch loops.

Run from the repository root: python -m benchmarks.bench_targets [--shapes 64x1024,8x8192]

The PyTorch loop is the reverse loop over time that TRL and OpenRLHF use
(one Python iteration per token); it runs when torch is installed.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import valuefn
from benchmarks.timing import format_table, measure

GAMMA, LAMBDA = 0.99, 0.95
DEFAULT_SHAPES = ((64, 1024), (8, 8192), (1024, 2048))


def numpy_gae(rewards, values, bootstrap, mask):
    """Reverse loop over time in NumPy, masked as OpenRLHF masks its inputs."""
    rewards, values = rewards * mask, values * mask
    advantages = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0], rewards.dtype)
    next_value = bootstrap
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + GAMMA * next_value - values[:, t]
        last = delta + GAMMA * LAMBDA * last
        advantages[:, t] = last
        next_value = values[:, t]
    return advantages, advantages + values


def torch_gae(torch, rewards, values, bootstrap, mask):
    """The TRL / OpenRLHF reverse loop: one Python iteration per token."""
    rewards, values = rewards * mask, values * mask
    last = 0.0
    reversed_advantages = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else bootstrap
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last = delta + GAMMA * LAMBDA * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def make_inputs(batch, horizon, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, horizon)).astype(np.float32)
    values = rng.normal(size=(batch, horizon)).astype(np.float32)
    bootstrap = rng.normal(size=(batch,)).astype(np.float32)
    mask = np.ones((batch, horizon), np.float32)
    return rewards, values, bootstrap, mask


def bench_shape(batch, horizon, repeats, torch):
    rewards, values, bootstrap, mask = make_inputs(batch, horizon)
    device_args = [jnp.asarray(x) for x in (rewards, values, bootstrap, mask)]
    figures = {}
    for name, kernel in (("gae", valuefn.gae), ("lambda_returns", valuefn.lambda_returns)):
        for method in ("scan", "associative", "auto"):
            fn = jax.jit(functools.partial(kernel, lambda_=LAMBDA, method=method))

            def call(fn=fn):
                r, v, b, m = device_args
                return fn(r, v, GAMMA, b, mask=m)

            figures[f"{name}/{method}"] = measure(call, repeats=repeats)
    slow_repeats = max(1, repeats // 3)
    figures["numpy loop"] = measure(
        lambda: numpy_gae(rewards, values, bootstrap, mask), repeats=slow_repeats, warmup=0
    )
    if torch is not None:
        torch_args = [torch.from_numpy(x) for x in (rewards, values, bootstrap, mask)]
        with torch.no_grad():
            figures["torch loop"] = measure(
                lambda: torch_gae(torch, *torch_args), repeats=slow_repeats, warmup=1
            )
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in DEFAULT_SHAPES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None

    print(f"backend {jax.default_backend()}, devices {jax.devices()}, jax {jax.__version__}")
    rows = []
    for batch, horizon in shapes:
        figures = bench_shape(batch, horizon, args.repeats, torch)
        baseline = figures.get("torch loop", figures["numpy loop"]).median
        for name, timing in figures.items():
            rows.append(
                [
                    f"{batch}x{horizon}",
                    name,
                    f"{timing.median * 1e3:.3f}",
                    f"{timing.min * 1e3:.3f}",
                    f"{baseline / timing.median:.1f}x",
                    f"{batch * horizon / timing.median / 1e6:.1f}",
                ]
            )
    baseline_name = "torch loop" if torch is not None else "numpy loop"
    headers = ["B x T", "kernel", "median ms", "min ms", f"vs {baseline_name}", "Msteps/s"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
