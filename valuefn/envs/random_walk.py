"""A random walk on a chain: a small MDP whose values are known in closed form.

States ``0..n-1`` lie on a line, with a terminal exit beyond each end. Action 1
moves right, action 0 moves left. Leaving on the left ends the episode with
``left_reward``, leaving on the right with ``right_reward``; every other move
pays ``step_reward``. Episodes start in ``start_state`` (uniformly at random if
None) and are cut after ``max_steps`` moves: a truncation, not a termination,
so the values of the infinite-horizon chain are the right targets (Pardo et
al., 2018). The observation is the one-hot position, ``[n]`` float32 (all zero
at an exit).

Under :func:`random_walk_policy`, which moves right with probability ``p``, the
values solve the Bellman equation ``V = r + gamma P V`` over the non-terminal
states: ``V = (I - gamma P)^-1 r`` (:func:`random_walk_values`).

References:
  Sutton & Barto, Reinforcement Learning: An Introduction, 2nd ed., 2018,
  example 6.2; Pardo et al., Time Limits in Reinforcement Learning, 2018.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from valuefn._checks import check_config
from valuefn.rollout import Environment

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RandomWalkConfig:
    """The chain.

    Attributes:
      num_states: non-terminal states, >= 1.
      max_steps: time limit per episode (truncation), >= 1.
      left_reward: reward for leaving on the left.
      right_reward: reward for leaving on the right.
      step_reward: reward for a move that stays on the chain.
      start_state: the first state of each episode, or None for uniform.
    """

    num_states: int = 7
    max_steps: int = 10
    left_reward: float = -1.0
    right_reward: float = 1.0
    step_reward: float = 0.0
    start_state: int | None = None

    def __post_init__(self):
        check_config(self)
        if self.num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {self.num_states}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.start_state is not None and not 0 <= self.start_state < self.num_states:
            raise ValueError(
                f"start_state must lie in [0, {self.num_states}) or be None, got {self.start_state}"
            )


class RandomWalkState(NamedTuple):
    position: Array  # [] int32, -1 or num_states at an exit
    time: Array  # [] int32, moves made in this episode


def random_walk(config: RandomWalkConfig = RandomWalkConfig()) -> Environment:
    """The chain as an :class:`~valuefn.rollout.Environment` (actions: 0 left, 1 right)."""
    n = config.num_states

    def observe(position: Array) -> Array:
        return jax.nn.one_hot(position, n, dtype=jnp.float32)

    def reset(key: Array) -> tuple[RandomWalkState, Array]:
        if config.start_state is None:
            position = jax.random.randint(key, (), 0, n, dtype=jnp.int32)
        else:
            position = jnp.asarray(config.start_state, jnp.int32)
        return RandomWalkState(position, jnp.zeros((), jnp.int32)), observe(position)

    def step(state: RandomWalkState, action: Array, key: Array):
        del key
        position = state.position + 2 * jnp.asarray(action, jnp.int32) - 1
        time = state.time + 1
        left, right = position < 0, position >= n
        reward = jnp.where(
            left, config.left_reward, jnp.where(right, config.right_reward, config.step_reward)
        ).astype(jnp.float32)
        terminated = left | right
        truncated = (time >= config.max_steps) & ~terminated
        return RandomWalkState(position, time), observe(position), reward, terminated, truncated

    return Environment(reset, step)


def random_walk_policy(params: Array, obs: Array, key: Array) -> Array:
    """Moves right (action 1) with probability ``params`` (a scalar in [0, 1])."""
    del obs
    return jax.random.bernoulli(key, params).astype(jnp.int32)


def random_walk_values(config: RandomWalkConfig, right_prob: float, gamma: float) -> np.ndarray:
    """Exact values of the non-terminal states under :func:`random_walk_policy`.

    ``V = (I - gamma P)^-1 r`` with ``P[i, i+1] = p``, ``P[i, i-1] = 1 - p``
    (rows of the end states lose the mass that exits) and ``r[i]`` the expected
    reward of one move from ``i``. The time limit does not enter: truncated
    episodes bootstrap, so these are the values the targets estimate.

    Args:
      config: the chain.
      right_prob: ``p`` in [0, 1].
      gamma: discount in [0, 1]; 1 too, since every walk on the chain ends at one
        of its two ends.

    Returns:
      float64 ``[num_states]`` values.
    """
    if not 0 <= right_prob <= 1:
        raise ValueError(f"right_prob must lie in [0, 1], got {right_prob!r}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    n = config.num_states
    transitions = np.zeros((n, n))
    rewards = np.zeros(n)
    for i in range(n):
        for j, prob in ((i + 1, right_prob), (i - 1, 1.0 - right_prob)):
            if 0 <= j < n:
                transitions[i, j] += prob
                rewards[i] += prob * config.step_reward
            else:
                rewards[i] += prob * (config.right_reward if j == n else config.left_reward)
    return np.linalg.solve(np.eye(n) - gamma * transitions, rewards)
