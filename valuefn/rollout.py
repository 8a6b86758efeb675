"""Batched, auto-resetting rollouts of pure-function environments.

An environment is two pure functions of ONE environment (no batch axis):

- ``reset(key) -> (env_state, obs)``
- ``step(env_state, action, key) -> (env_state, obs, reward, terminated, truncated)``

``terminated`` means the new state is terminal (its value is 0); ``truncated``
means a time limit cut the episode there (the new state is not terminal, its
value still counts). :func:`rollout` runs many environments with ``jax.vmap``
and time with ``lax.scan``, resets those that finished, and records what the
target kernels of :mod:`valuefn.targets` need, time-last::

    traj, state = rollout(env, policy, policy_params, value_fn, value_params,
                          reset_envs(env, key_reset, num_envs=64), key, num_steps=128)
    returns = valuefn.lambda_returns(
        traj.rewards, traj.values, valuefn.discounts(0.99, traj.terminated),
        traj.bootstrap_value, 0.95,
        truncated=traj.truncated, final_values=traj.final_values)

References:
  Pardo et al., Time Limits in Reinforcement Learning, 2018 (bootstrapping at
  time-limit truncations); Lu et al., Discovered Policy Optimisation, 2022
  (purejaxrl: the whole loop as one jitted ``lax.scan``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from valuefn._checks import check_count, check_key

Array = jax.Array
PyTree = Any

Policy = Callable[[PyTree, PyTree, Array], PyTree]
"""``policy(params, obs, key) -> action`` for one observation."""
ValueFn = Callable[[PyTree, PyTree], Array]
"""``value_fn(params, obs) -> V(obs)``, a scalar for one observation."""


class Environment(NamedTuple):
    """A pure-function environment (one instance; :func:`rollout` vmaps it).

    Attributes:
      reset: ``reset(key) -> (env_state, obs)``.
      step: ``step(env_state, action, key) -> (env_state, obs, reward, terminated,
        truncated)``; ``reward`` a scalar, the two flags scalar bools.
    """

    reset: Callable[[Array], tuple[PyTree, PyTree]]
    step: Callable[[PyTree, PyTree, Array], tuple[PyTree, PyTree, Array, Array, Array]]


class RolloutState(NamedTuple):
    """Where a batch of environments stands between rollouts."""

    env_state: PyTree  # leaves [num_envs, ...]
    obs: PyTree  # leaves [num_envs, ...], the observation the next action is taken at


class Trajectory(NamedTuple):
    """``num_steps`` steps of ``num_envs`` environments, time on axis 1.

    Step ``t`` of environment ``i`` is: at observation ``obs[i, t]`` (with value
    ``values[i, t]``) the policy took ``actions[i, t]``; the environment returned
    ``rewards[i, t]`` and the flags. Where a flag is set the next row
    ``obs[i, t + 1]`` is the first observation of a fresh episode.
    """

    obs: PyTree  # leaves [num_envs, num_steps, ...], s_t
    actions: PyTree  # leaves [num_envs, num_steps, ...], a_t
    rewards: Array  # [num_envs, num_steps] float32, r_t
    terminated: Array  # [num_envs, num_steps] bool, s_{t+1} is terminal
    truncated: Array  # [num_envs, num_steps] bool, time limit after step t (and not terminated)
    values: Array  # [num_envs, num_steps] float32, V(s_t)
    final_values: Array  # [num_envs, num_steps] float32, V(final obs) where truncated, else 0
    bootstrap_value: Array  # [num_envs] float32, V of the observation after the last step


def _select(pred: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-environment ``where`` over matching pytrees with leaves ``[num_envs, ...]``."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def step_keys(key: Array, num_envs: int) -> Array:
    """The keys one rollout step uses: ``[num_envs, 3]``.

    Environment ``i`` takes ``[i, 0]`` for the policy, ``[i, 1]`` for ``step`` and
    ``[i, 2]`` for ``reset`` if it finishes. :func:`rollout` derives step ``t``'s
    ``key`` as ``jax.random.split(key, num_steps)[t]``.
    """
    return jax.random.split(key, (check_count("num_envs", num_envs), 3))


def reset_envs(env: Environment, key: Array, num_envs: int) -> RolloutState:
    """Resets ``num_envs`` environments; ``i`` uses ``jax.random.split(key, num_envs)[i]``.

    Args:
      env: the environment.
      key: a PRNG key.
      num_envs: static Python int >= 1.

    Returns:
      a :class:`RolloutState` with leaves ``[num_envs, ...]``.
    """
    keys = jax.random.split(check_key("key", key), check_count("num_envs", num_envs))
    env_state, obs = jax.vmap(env.reset)(keys)
    return RolloutState(env_state, obs)


def rollout(
    env: Environment,
    policy: Policy,
    policy_params: PyTree,
    value_fn: ValueFn,
    value_params: PyTree,
    state: RolloutState,
    key: Array,
    *,
    num_steps: int,
) -> tuple[Trajectory, RolloutState]:
    """Runs ``num_steps`` steps of a batch of environments, resetting finished ones.

    Each step, for every environment at once (``jax.vmap``; time is a
    ``lax.scan``): ``a_t = policy(policy_params, s_t, k_policy)``, then
    ``env.step(..., a_t, k_step)``. Where the step ends the episode (terminated or
    truncated) the environment is reset with ``k_reset`` and the next step starts
    from the fresh observation; where it was truncated, the value of the final
    observation (before the reset) is recorded in ``final_values``, so that the
    targets bootstrap from it rather than from the next episode. Keys follow
    :func:`step_keys`.

    ``policy`` and ``value_fn`` see one observation at a time and are vmapped,
    parameters shared. The function is pure: call it inside your own jitted
    step, or jit it with the functions static::

      run = jax.jit(rollout, static_argnames=("env", "policy", "value_fn", "num_steps"))

    Static arguments are compared by hash, so build ``env`` once and reuse it:
    every new closure compiles again.

    Args:
      env: the environment.
      policy: ``policy(params, obs, key) -> action``.
      policy_params: pytree passed to ``policy``.
      value_fn: ``value_fn(params, obs) -> scalar``.
      value_params: pytree passed to ``value_fn``.
      state: where the environments stand (:func:`reset_envs`, or the state a
        previous rollout returned); its leading axis is ``num_envs``.
      key: a PRNG key for this rollout.
      num_steps: static Python int >= 1.

    Returns:
      ``(trajectory, state)``: the :class:`Trajectory` with arrays
      ``[num_envs, num_steps, ...]`` (time last for rewards, flags and values, as
      the target kernels expect), and the state to continue from.
    """
    num_steps = check_count("num_steps", num_steps)
    key = check_key("key", key)
    leaves = jax.tree.leaves(state.obs)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("state.obs must have leaves with a leading num_envs axis")
    num_envs = jnp.shape(leaves[0])[0]
    act = jax.vmap(policy, in_axes=(None, 0, 0))
    vmapped_value = jax.vmap(value_fn, in_axes=(None, 0))

    def value(params, obs):
        values = vmapped_value(params, obs)
        if jnp.shape(values) != (num_envs,):
            raise ValueError(
                f"value_fn must return a scalar for each observation, got shape "
                f"{jnp.shape(values)[1:]}"
            )
        return values

    env_step = jax.vmap(env.step)
    env_reset = jax.vmap(env.reset)

    def body(carry: RolloutState, key_t: Array):
        env_state, obs = carry
        keys = step_keys(key_t, num_envs)
        action = act(policy_params, obs, keys[:, 0])
        next_state, next_obs, reward, terminated, truncated = env_step(
            env_state, action, keys[:, 1]
        )
        terminated = jnp.asarray(terminated, bool)
        truncated = jnp.asarray(truncated, bool) & ~terminated
        final_values = jnp.where(truncated, value(value_params, next_obs), 0.0)
        reset_state, reset_obs = env_reset(keys[:, 2])
        done = terminated | truncated
        carry = RolloutState(
            _select(done, reset_state, next_state), _select(done, reset_obs, next_obs)
        )
        record = (
            obs,
            action,
            jnp.asarray(reward, jnp.float32),
            terminated,
            truncated,
            jnp.asarray(value(value_params, obs), jnp.float32),
            final_values.astype(jnp.float32),
        )
        return carry, record

    state, records = jax.lax.scan(body, state, jax.random.split(key, num_steps))
    time_second = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), records)
    bootstrap_value = jnp.asarray(value(value_params, state.obs), jnp.float32)
    return Trajectory(*time_second, bootstrap_value=bootstrap_value), state
