"""Tests for valuefn.rollout: hand-checked auto-resets and a one-env-at-a-time reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import valuefn
from valuefn.envs import RandomWalkConfig, random_walk

RUN = jax.jit(valuefn.rollout, static_argnames=("env", "policy", "value_fn", "num_steps"))


def counter_env(terminate_at: int, time_limit: int) -> valuefn.Environment:
    """count += action; terminal at ``terminate_at``; cut after ``time_limit`` steps.

    The observation is ``[count, time]``, so the value ``10 count + time`` tells a
    final observation from the fresh one that replaces it.
    """

    def reset(key):
        del key
        return (jnp.int32(0), jnp.int32(0)), jnp.zeros(2, jnp.float32)

    def step(state, action, key):
        del key
        count, time = state[0] + action, state[1] + 1
        obs = jnp.stack([count, time]).astype(jnp.float32)
        return (
            (count, time),
            obs,
            count.astype(jnp.float32),
            count >= terminate_at,
            time >= time_limit,
        )

    return valuefn.Environment(reset, step)


def constant_policy(params, obs, key):
    del obs, key
    return jnp.asarray(params, jnp.int32)


def linear_value(params, obs):
    return obs @ params


VALUE_PARAMS = jnp.array([10.0, 1.0])


def _run_counter(terminate_at, time_limit, action, num_steps=7, num_envs=2):
    env = counter_env(terminate_at, time_limit)
    state = valuefn.reset_envs(env, jax.random.key(0), num_envs)
    return RUN(
        env,
        constant_policy,
        action,
        linear_value,
        VALUE_PARAMS,
        state,
        jax.random.key(1),
        num_steps=num_steps,
    )


def _assert_rows(traj, counts, rewards, terminated, truncated, final_values, bootstrap):
    for i in range(traj.rewards.shape[0]):
        np.testing.assert_array_equal(traj.obs[i, :, 0], counts)
        np.testing.assert_array_equal(traj.values[i], 10.0 * traj.obs[i, :, 0] + traj.obs[i, :, 1])
        np.testing.assert_array_equal(traj.rewards[i], rewards)
        np.testing.assert_array_equal(traj.terminated[i], terminated)
        np.testing.assert_array_equal(traj.truncated[i], truncated)
        np.testing.assert_array_equal(traj.final_values[i], final_values)
        np.testing.assert_array_equal(traj.bootstrap_value[i], bootstrap)


@pytest.mark.parametrize("time_limit", [100, 3])
def test_terminated_episodes_reset_and_record_no_final_value(time_limit):
    # With time_limit 3 the limit falls on the terminal steps: termination wins.
    traj, state = _run_counter(terminate_at=3, time_limit=time_limit, action=1)
    f, t = False, True
    _assert_rows(
        traj,
        counts=[0, 1, 2, 0, 1, 2, 0],
        rewards=[1, 2, 3, 1, 2, 3, 1],
        terminated=[f, f, t, f, f, t, f],
        truncated=[f] * 7,
        final_values=[0] * 7,
        bootstrap=10.0 * 1 + 1,  # after step 7 the env is at count 1, time 1
    )
    np.testing.assert_array_equal(state.obs, [[1.0, 1.0]] * 2)


def test_truncated_episodes_record_the_value_of_the_final_observation_before_reset():
    traj, _ = _run_counter(terminate_at=100, time_limit=3, action=0)
    f, t = False, True
    _assert_rows(
        traj,
        counts=[0] * 7,
        rewards=[0] * 7,
        terminated=[f] * 7,
        truncated=[f, f, t, f, f, t, f],
        final_values=[0, 0, 3, 0, 0, 3, 0],  # V([0, 3]): time 3, not the reset's time 0
        bootstrap=1.0,
    )
    np.testing.assert_array_equal(traj.obs[0, :, 1], [0, 1, 2, 0, 1, 2, 0])


def noisy_walk_policy(params, obs, key):
    """Right with probability sigmoid(params . obs): depends on params, obs and key."""
    return jax.random.bernoulli(key, jax.nn.sigmoid(obs @ params)).astype(jnp.int32)


def walk_value(params, obs):
    return jnp.tanh(obs @ params)


WALK = RandomWalkConfig(num_states=5, max_steps=4)
WALK_ENV = random_walk(WALK)
POLICY_PARAMS = jnp.linspace(-1.0, 1.5, WALK.num_states)
WALK_VALUE_PARAMS = jnp.linspace(-2.0, 2.0, WALK.num_states)
WALK_SHAPE = (3, 12)  # num_envs, num_steps: one shape, so RUN compiles once for the walk


def with_reward_noise(env: valuefn.Environment) -> valuefn.Environment:
    """Adds U(0, 1) noise drawn with the step's own key to each reward."""

    def step(state, action, key):
        state, obs, reward, terminated, truncated = env.step(state, action, key)
        return state, obs, reward + jax.random.uniform(key), terminated, truncated

    return valuefn.Environment(env.reset, step)


NOISY_WALK_ENV = with_reward_noise(WALK_ENV)


def _reference_rollout(
    env, policy, policy_params, value_fn, value_params, key_reset, key, *, num_envs, num_steps
):
    """One environment at a time in Python, keys derived as documented."""
    fields = ("obs", "actions", "rewards", "terminated", "truncated", "values", "final_values")
    out = {
        name: np.zeros((num_envs, num_steps) + (() if name != "obs" else (5,))) for name in fields
    }
    bootstrap, last_obs = np.zeros(num_envs), []
    per_step = jax.random.split(key, num_steps)
    for i in range(num_envs):
        env_state, obs = env.reset(jax.random.split(key_reset, num_envs)[i])
        for t in range(num_steps):
            k_policy, k_step, k_reset = jax.random.split(per_step[t], (num_envs, 3))[i]
            action = policy(policy_params, obs, k_policy)
            env_state, next_obs, reward, terminated, truncated = env.step(env_state, action, k_step)
            terminated, truncated = bool(terminated), bool(truncated) and not bool(terminated)
            record = {
                "obs": obs,
                "actions": action,
                "rewards": reward,
                "terminated": terminated,
                "truncated": truncated,
                "values": value_fn(value_params, obs),
                "final_values": value_fn(value_params, next_obs) if truncated else 0.0,
            }
            for name, value in record.items():
                out[name][i, t] = np.asarray(value)
            obs = next_obs
            if terminated or truncated:
                env_state, obs = env.reset(k_reset)
        bootstrap[i] = value_fn(value_params, obs)
        last_obs.append(np.asarray(obs))
    return out, bootstrap, np.stack(last_obs)


def test_rollout_matches_a_one_env_at_a_time_python_loop():
    num_envs, num_steps = WALK_SHAPE
    key_reset, key = jax.random.key(3), jax.random.key(4)
    state = valuefn.reset_envs(NOISY_WALK_ENV, key_reset, num_envs)
    traj, final = RUN(
        NOISY_WALK_ENV,
        noisy_walk_policy,
        POLICY_PARAMS,
        walk_value,
        WALK_VALUE_PARAMS,
        state,
        key,
        num_steps=num_steps,
    )
    expected, bootstrap, last_obs = _reference_rollout(
        NOISY_WALK_ENV,
        noisy_walk_policy,
        POLICY_PARAMS,
        walk_value,
        WALK_VALUE_PARAMS,
        key_reset,
        key,
        num_envs=num_envs,
        num_steps=num_steps,
    )
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(traj, name), value, rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(traj.bootstrap_value, bootstrap, rtol=1e-6)
    np.testing.assert_array_equal(final.obs, last_obs)
    # The run exercises everything it checks: both kinds of episode end.
    assert np.any(expected["terminated"]) and np.any(expected["truncated"])


def test_rollout_shapes_dtypes_and_determinism():
    num_envs, num_steps = WALK_SHAPE
    state = valuefn.reset_envs(WALK_ENV, jax.random.key(0), num_envs)
    args = (WALK_ENV, noisy_walk_policy, POLICY_PARAMS, walk_value, WALK_VALUE_PARAMS, state)
    traj, next_state = RUN(*args, jax.random.key(1), num_steps=num_steps)
    again, _ = RUN(*args, jax.random.key(1), num_steps=num_steps)
    other, _ = RUN(*args, jax.random.key(2), num_steps=num_steps)
    assert traj.obs.shape == (num_envs, num_steps, WALK.num_states)
    for name in ("actions", "rewards", "terminated", "truncated", "values", "final_values"):
        assert getattr(traj, name).shape == (num_envs, num_steps), name
    assert traj.bootstrap_value.shape == (num_envs,)
    assert traj.rewards.dtype == traj.values.dtype == traj.final_values.dtype == jnp.float32
    assert traj.terminated.dtype == traj.truncated.dtype == jnp.bool_
    assert jax.tree.map(jnp.shape, next_state) == jax.tree.map(jnp.shape, state)
    jax.tree.map(np.testing.assert_array_equal, traj, again)
    assert not np.array_equal(traj.actions, other.actions)


@pytest.mark.parametrize(("terminate_at", "time_limit"), [(3, 10), (10, 3)])
def test_rollout_gives_float32_rewards_and_bool_flags_for_any_dtypes_the_env_returns(
    terminate_at, time_limit
):
    env = counter_env(terminate_at, time_limit)

    def step(state, action, key):
        state, obs, reward, terminated, truncated = env.step(state, action, key)
        as_int, as_float = terminated.astype(jnp.int32), truncated.astype(jnp.float32)
        return state, obs, reward.astype(jnp.int32), as_int, as_float

    trajectories = [
        RUN(
            e,
            constant_policy,
            1,
            linear_value,
            VALUE_PARAMS,
            valuefn.reset_envs(e, jax.random.key(0), 2),
            jax.random.key(1),
            num_steps=9,
        )[0]
        for e in (env, valuefn.Environment(env.reset, step))
    ]
    expected, cast = trajectories
    assert cast.rewards.dtype == jnp.float32
    assert cast.terminated.dtype == cast.truncated.dtype == jnp.bool_
    jax.tree.map(np.testing.assert_array_equal, cast, expected)
    assert np.any(expected.terminated if terminate_at < time_limit else expected.truncated)


def test_rollout_handles_pytree_observations_and_actions():
    def reset(key):
        return jnp.int32(0), {"t": jnp.float32(0), "noise": jax.random.normal(key, (2,))}

    def step(state, action, key):
        obs = {"t": (state + 1).astype(jnp.float32), "noise": jax.random.normal(key, (2,))}
        return state + 1, obs, action["a"].sum(), state + 1 >= 2, jnp.bool_(False)

    def policy(params, obs, key):
        return {"a": obs["noise"] * params, "b": jax.random.uniform(key, (3,))}

    env = valuefn.Environment(reset, step)
    state = valuefn.reset_envs(env, jax.random.key(0), 2)
    traj, _ = valuefn.rollout(
        env, policy, 2.0, lambda p, o: o["t"], None, state, jax.random.key(1), num_steps=5
    )
    assert traj.obs["noise"].shape == (2, 5, 2) and traj.actions["b"].shape == (2, 5, 3)
    np.testing.assert_array_equal(traj.obs["t"], [[0, 1, 0, 1, 0]] * 2)
    np.testing.assert_allclose(traj.rewards, 2.0 * traj.obs["noise"].sum(-1), rtol=1e-6)


def test_continued_rollouts_chain_through_the_returned_state():
    num_envs, num_steps = WALK_SHAPE
    state = valuefn.reset_envs(WALK_ENV, jax.random.key(5), num_envs)
    args = (WALK_ENV, noisy_walk_policy, POLICY_PARAMS, walk_value, WALK_VALUE_PARAMS)
    first, state = RUN(*args, state, jax.random.key(6), num_steps=num_steps)
    second, _ = RUN(*args, state, jax.random.key(7), num_steps=num_steps)
    done = first.terminated[:, -1] | first.truncated[:, -1]
    np.testing.assert_allclose(first.bootstrap_value, second.values[:, 0], rtol=1e-6)
    # Where the last step did not end the episode, the walk goes on from where it stood.
    position = np.argmax(first.obs[:, -1], -1) + 2 * np.asarray(first.actions[:, -1]) - 1
    for i in np.flatnonzero(~done):
        assert np.argmax(second.obs[i, 0]) == position[i]


def test_rollout_rejects_bad_counts_keys_and_value_functions():
    state = valuefn.reset_envs(WALK_ENV, jax.random.key(0), 2)
    with pytest.raises(ValueError, match="num_steps"):
        valuefn.rollout(
            WALK_ENV,
            noisy_walk_policy,
            POLICY_PARAMS,
            walk_value,
            WALK_VALUE_PARAMS,
            state,
            jax.random.key(1),
            num_steps=0,
        )
    with pytest.raises(ValueError, match="num_envs"):
        valuefn.reset_envs(WALK_ENV, jax.random.key(0), 0)
    run = functools.partial(
        valuefn.rollout, WALK_ENV, noisy_walk_policy, POLICY_PARAMS, num_steps=3
    )
    for key in (0, np.zeros(2, np.float32), jax.random.split(jax.random.key(1), 2)):
        with pytest.raises(ValueError, match=r"\bkey\b"):
            run(walk_value, WALK_VALUE_PARAMS, state, key)
        with pytest.raises(ValueError, match=r"\bkey\b"):
            valuefn.reset_envs(WALK_ENV, key, 2)
    assert run(walk_value, WALK_VALUE_PARAMS, state, jax.random.PRNGKey(1))[0].rewards.shape == (
        2,
        3,
    )

    def value_of_shape_1(params, obs):  # a Linear(F, 1) head, say
        return walk_value(params, obs)[None]

    with pytest.raises(ValueError, match=r"value_fn must return a scalar .* \(1,\)"):
        run(value_of_shape_1, WALK_VALUE_PARAMS, state, jax.random.key(1))
