"""Environment steps per second: the jitted, vmapped rollout against a Python loop.

Run from the repository root:
python -m benchmarks.bench_rollout [--num-envs 1,64,1024,8192] [--num-steps 128]

Both sides do the same work per step on the random-walk chain: a policy draw, an
environment step, a small MLP critic on the observation and on the next one
(for ``final_values``), and the reset of finished episodes. The loop is the
best case for a host-driven rollout: one environment at a time, every function
jitted on its own, so each step is a handful of compiled calls and host
round trips. The rollout is ``valuefn.rollout`` jitted whole: ``jax.vmap`` over
environments, ``lax.scan`` over steps, one call.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import valuefn
from benchmarks.timing import format_table, measure
from valuefn.envs import RandomWalkConfig, random_walk, random_walk_policy

CONFIG = RandomWalkConfig(num_states=16, max_steps=32)
HIDDEN = 64


def mlp_value(params, obs):
    """A two-layer critic on the one-hot observation."""
    w1, b1, w2 = params
    return jnp.tanh(obs @ w1 + b1) @ w2


def init_value_params(key):
    k1, k2 = jax.random.split(key)
    return (
        jax.random.normal(k1, (CONFIG.num_states, HIDDEN)) / np.sqrt(CONFIG.num_states),
        jnp.zeros(HIDDEN),
        jax.random.normal(k2, (HIDDEN,)) / np.sqrt(HIDDEN),
    )


def python_loop(env, value_params, key, num_envs, num_steps):
    """One environment at a time; each of reset, step, policy and critic jitted alone."""
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    act, value = jax.jit(random_walk_policy), jax.jit(mlp_value)
    split = jax.jit(lambda k: jax.random.split(k, 4))

    def run():
        rewards = []
        for i in range(num_envs):
            key_i = jax.random.fold_in(key, i)
            env_state, obs = reset(key_i)
            for _ in range(num_steps):
                key_i, k_policy, k_step, k_reset = split(key_i)
                action = act(0.5, obs, k_policy)
                value(value_params, obs)
                env_state, obs, reward, terminated, truncated = step(env_state, action, k_step)
                if bool(truncated):
                    value(value_params, obs)
                if bool(terminated) or bool(truncated):
                    env_state, obs = reset(k_reset)
                rewards.append(reward)
        return rewards

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-envs", default="1,64,1024,8192")
    parser.add_argument("--num-steps", type=int, default=128)
    parser.add_argument("--loop-envs", type=int, default=4)
    parser.add_argument("--loop-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    print(f"backend {jax.default_backend()}, devices {jax.devices()}, jax {jax.__version__}")
    env = random_walk(CONFIG)
    value_params = init_value_params(jax.random.key(0))
    key = jax.random.key(1)

    loop_steps = args.loop_envs * args.loop_steps
    loop = measure(
        python_loop(env, value_params, key, args.loop_envs, args.loop_steps),
        repeats=max(1, args.repeats // 2),
    )
    loop_rate = loop_steps / loop.median
    rows = [
        [
            "python loop",
            f"{args.loop_envs}x{args.loop_steps}",
            f"{loop.median * 1e3:.1f}",
            f"{loop_rate:,.0f}",
            "1.0x",
        ]
    ]

    run = jax.jit(valuefn.rollout, static_argnames=("env", "policy", "value_fn", "num_steps"))
    for num_envs in (int(n) for n in args.num_envs.split(",")):
        state = valuefn.reset_envs(env, key, num_envs)

        def call(state=state):
            return run(
                env, random_walk_policy, 0.5, mlp_value, value_params, state, key,
                num_steps=args.num_steps,
            )  # fmt: skip

        timing = measure(call, repeats=args.repeats)
        rate = num_envs * args.num_steps / timing.median
        rows.append(
            [
                "rollout (jit, vmap, scan)",
                f"{num_envs}x{args.num_steps}",
                f"{timing.median * 1e3:.1f}",
                f"{rate:,.0f}",
                f"{rate / loop_rate:,.0f}x",
            ]
        )
    headers = ["method", "envs x steps", "median ms", "env steps/s", "vs loop"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
