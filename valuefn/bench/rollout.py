"""Environment steps per second: the jitted, vmapped rollout against a Python loop.

Both sides do the same work per step on the random-walk chain: a policy draw, an
environment step, a small MLP critic on the observation and on the next one
(for ``final_values``), and the reset of finished episodes. The loop is the
best case for a host-driven rollout: one environment at a time, every function
jitted on its own, so each step is a handful of compiled calls and host
round trips. The rollout is ``valuefn.rollout`` jitted whole: ``jax.vmap`` over
environments, ``lax.scan`` over steps, one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import valuefn
from valuefn.bench.figures import Figure, measure, timed
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


def run(quick: bool) -> list[Figure]:
    num_envs_list, num_steps = ((1, 8), 8) if quick else ((1, 64, 1024, 8192), 128)
    loop_envs, loop_steps = (1, 4) if quick else (4, 64)
    repeats = 3 if quick else 7
    env = random_walk(CONFIG)
    value_params = init_value_params(jax.random.key(0))
    key = jax.random.key(1)

    loop = measure(
        python_loop(env, value_params, key, loop_envs, loop_steps), repeats=max(1, repeats // 2)
    )
    loop_name = f"rollout python loop {loop_envs}x{loop_steps}"
    # The loop runs fewer steps than the rollouts: compare time per step.
    per_step = loop.median / (loop_envs * loop_steps)
    figures = [timed(loop_name, loop, work=loop_envs * loop_steps, work_unit="env steps")]

    rollout = jax.jit(valuefn.rollout, static_argnames=("env", "policy", "value_fn", "num_steps"))
    for num_envs in num_envs_list:
        state = valuefn.reset_envs(env, key, num_envs)

        def call(state=state):
            return rollout(
                env, random_walk_policy, 0.5, mlp_value, value_params, state, key,
                num_steps=num_steps,
            )  # fmt: skip

        work = num_envs * num_steps
        figures.append(
            timed(
                f"rollout jit+vmap+scan {num_envs}x{num_steps}",
                measure(call, repeats=repeats),
                baseline=f"{loop_name}, per step x {work}",
                baseline_median=per_step * work,
                work=work,
                work_unit="env steps",
            )
        )
    return figures
