"""Environment steps per second: the jitted, vmapped rollout against a host loop.

Both sides do the same work per step on the random-walk chain, for all
environments at once: a policy draw, an environment step, a small MLP critic on
the observation and on the next one (for ``final_values``), and the reset of
finished episodes. The rollout is ``valuefn.rollout`` jitted whole: ``jax.vmap``
over environments, ``lax.scan`` over steps, one call. The baseline is the loop a
host-driven trainer runs: Python steps through time and each step is one jitted,
vmapped call (:func:`host_loop`), timed at the same sizes in the same rounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import valuefn
from valuefn.bench.figures import Figure, measure_many, timed
from valuefn.envs import RandomWalkConfig, random_walk, random_walk_policy

CONFIG = RandomWalkConfig(num_states=16, max_steps=32)
HIDDEN = 64


def mlp_value(params, obs):
    """A two-layer critic on the one-hot observation."""
    w1, b1, w2 = params
    return jnp.tanh(obs @ w1 + b1) @ w2


def init_value_params(key):
    """Parameters of :func:`mlp_value`."""
    k1, k2 = jax.random.split(key)
    return (
        jax.random.normal(k1, (CONFIG.num_states, HIDDEN)) / np.sqrt(CONFIG.num_states),
        jnp.zeros(HIDDEN),
        jax.random.normal(k2, (HIDDEN,)) / np.sqrt(HIDDEN),
    )


def host_loop(env, value_params, key, state, num_steps):
    """Python steps through time; each step is one jitted call over all environments.

    The call is :func:`valuefn.rollout` of one step with its bootstrap value
    dropped (so XLA does not compute it): the same vmapped policy, environment
    step, critic and resets as one step of the scan. The loop keeps the state on
    the device and stacks the steps at the end, as a host-driven trainer would.
    """

    @jax.jit
    def one_step(state, key):
        trajectory, state = valuefn.rollout(
            env, random_walk_policy, 0.5, mlp_value, value_params, state, key, num_steps=1
        )
        return trajectory._replace(bootstrap_value=None), state

    def run():
        current, steps = state, []
        for key_t in jax.random.split(key, num_steps):
            step, current = one_step(current, key_t)
            steps.append(step)
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *steps), current

    return run


def run(quick: bool) -> list[Figure]:
    """The rollout against the host loop at each number of environments (``quick``: tiny sizes)."""
    num_envs_list, num_steps = ((1, 8), 8) if quick else ((1, 64, 1024, 8192), 128)
    repeats = 3 if quick else 7
    env = random_walk(CONFIG)
    value_params = init_value_params(jax.random.key(0))
    key = jax.random.key(1)

    rollout = jax.jit(valuefn.rollout, static_argnames=("env", "policy", "value_fn", "num_steps"))
    figures = []
    for num_envs in num_envs_list:
        state = valuefn.reset_envs(env, key, num_envs)

        def call(state=state):
            return rollout(
                env, random_walk_policy, 0.5, mlp_value, value_params, state, key,
                num_steps=num_steps,
            )  # fmt: skip

        loop_name = f"rollout host loop {num_envs}x{num_steps}"
        timings = measure_many(
            {"scan": call, "loop": host_loop(env, value_params, key, state, num_steps)},
            repeats=repeats,
        )
        work = num_envs * num_steps
        figures += [
            timed(loop_name, timings["loop"], work=work, work_unit="env steps"),
            timed(
                f"rollout jit+vmap+scan {num_envs}x{num_steps}",
                timings["scan"],
                against=(loop_name, timings["loop"]),
                work=work,
                work_unit="env steps",
            ),
        ]
    return figures
