"""Tests for the built-in environments: the random walk's values and the dialogue task."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import valuefn
from valuefn.envs import (
    DialogueConfig,
    RandomWalkConfig,
    dialogue_models,
    dialogue_scores,
    random_walk,
    random_walk_policy,
    random_walk_values,
    sample_dialogues,
)
from valuefn.envs.dialogue import EOS, FIRST_ORDINARY, PAD, USER

# --- random walk -------------------------------------------------------------------------


def test_random_walk_values_match_sutton_barto_example_6_2():
    # Five states, reward 1 only on the right exit, no discount: V(i) = (i + 1) / 6.
    config = RandomWalkConfig(num_states=5, left_reward=0.0, right_reward=1.0)
    np.testing.assert_allclose(random_walk_values(config, 0.5, 1.0), np.arange(1, 6) / 6)


@pytest.mark.parametrize(("right_prob", "gamma"), [(0.5, 0.9), (0.8, 0.99), (0.0, 0.5)])
def test_random_walk_values_match_iterative_policy_evaluation(right_prob, gamma):
    config = RandomWalkConfig(num_states=6, left_reward=-1.0, right_reward=2.0, step_reward=-0.1)
    values = np.zeros(6)
    for _ in range(5000):
        new = np.zeros(6)
        for i in range(6):
            for j, prob in ((i + 1, right_prob), (i - 1, 1 - right_prob)):
                if j < 0:
                    new[i] += prob * -1.0
                elif j >= 6:
                    new[i] += prob * 2.0
                else:
                    new[i] += prob * (-0.1 + gamma * values[j])
        values = new
    np.testing.assert_allclose(random_walk_values(config, right_prob, gamma), values, atol=1e-9)


def test_random_walk_steps_exits_and_time_limit():
    env = random_walk(RandomWalkConfig(num_states=3, max_steps=3, start_state=0, step_reward=0.5))
    state, obs = env.reset(jax.random.key(0))
    np.testing.assert_array_equal(obs, [1, 0, 0])
    key = jax.random.key(1)
    right, _, reward, terminated, truncated = env.step(state, 1, key)
    assert int(right.position) == 1 and float(reward) == 0.5
    assert not terminated and not truncated
    _, obs, reward, terminated, truncated = env.step(state, 0, key)
    np.testing.assert_array_equal(obs, [0, 0, 0])
    assert float(reward) == -1.0 and terminated and not truncated
    state = right
    for _ in range(2):
        state, obs, reward, terminated, truncated = env.step(state, 1, key)
    assert float(reward) == 1.0 and terminated and not truncated  # exit on the time limit
    state = right
    for action in (0, 1):
        state, obs, _, terminated, truncated = env.step(state, action, key)
    assert not terminated and truncated and int(state.time) == 3
    np.testing.assert_array_equal(obs, [0, 1, 0])


def test_random_walk_starts_uniformly():
    env = random_walk(RandomWalkConfig(num_states=4))
    _, obs = jax.vmap(env.reset)(jax.random.split(jax.random.key(0), 4000))
    frequencies = np.asarray(obs).mean(axis=0)
    np.testing.assert_allclose(frequencies, 0.25, atol=0.03)


WALK = RandomWalkConfig(num_states=5, max_steps=6)
RIGHT_PROB, GAMMA = 0.6, 0.9


@jax.jit
def _walk_returns(value_params):
    """Discounted returns of a 1024 x 64 rollout of WALK, and the state of each step."""
    env = random_walk(WALK)
    state = valuefn.reset_envs(env, jax.random.key(0), 1024)
    traj, _ = valuefn.rollout(
        env,
        random_walk_policy,
        RIGHT_PROB,
        lambda params, obs: obs @ params,
        value_params,
        state,
        jax.random.key(1),
        num_steps=64,
    )
    returns = valuefn.discounted_returns(
        traj.rewards,
        valuefn.discounts(GAMMA, traj.terminated),
        traj.bootstrap_value,
        truncated=traj.truncated,
        final_values=traj.final_values,
    )
    return returns, jnp.argmax(traj.obs, axis=-1)


def _monte_carlo_by_state(value_params):
    """Returns averaged per state, with standard errors clustered by environment."""
    returns, states = jax.tree.map(np.asarray, _walk_returns(value_params))
    means, errors = [], []
    for i in range(WALK.num_states):
        visits = states == i
        sums, counts = (returns * visits).sum(axis=1), visits.sum(axis=1)
        mean = sums.sum() / counts.sum()
        means.append(mean)
        # Environments are independent; the steps within one are not.
        errors.append(np.sqrt(np.sum((sums - mean * counts) ** 2)) / counts.sum())
    return np.array(means), np.array(errors)


def test_monte_carlo_returns_of_the_rollout_agree_with_the_closed_form_values():
    exact = random_walk_values(WALK, RIGHT_PROB, GAMMA)
    # Truncated episodes bootstrap from V(final observation) = the exact values.
    means, errors = _monte_carlo_by_state(jnp.asarray(exact, jnp.float32))
    # Standard errors are 0.003 to 0.008; the tolerance is about 4 of them.
    assert np.all(errors < 0.01)
    np.testing.assert_allclose(means, exact, atol=0.03)
    # Control: without bootstrapping at the time limit the estimates are far off.
    biased, _ = _monte_carlo_by_state(jnp.zeros(WALK.num_states))
    assert np.max(np.abs(biased - exact)) > 0.1


def test_random_walk_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_states"):
        RandomWalkConfig(num_states=0)
    with pytest.raises(ValueError, match="start_state"):
        RandomWalkConfig(num_states=3, start_state=3)
    with pytest.raises(ValueError, match="gamma"):
        random_walk_values(RandomWalkConfig(), 0.5, 1.5)
    for right_prob in (-0.1, 1.5):
        with pytest.raises(ValueError, match="right_prob"):
            random_walk_values(RandomWalkConfig(), right_prob, 0.9)
    with pytest.raises(ValueError, match="num_states must be an integer"):
        RandomWalkConfig(num_states=2.5)
    with pytest.raises(ValueError, match="start_state must be an integer or None"):
        RandomWalkConfig(start_state=True)


# --- dialogue task -----------------------------------------------------------------------

CONFIG = DialogueConfig()
BATCH = 64
SAMPLE = jax.jit(sample_dialogues, static_argnames=("batch_size", "config"))


@pytest.fixture(scope="module")
def dialogues():
    return jax.tree.map(np.asarray, SAMPLE(jax.random.key(0), BATCH))


def _np_logprobs(model, last, counts, position, config):
    """The language model of valuefn.envs.dialogue, rewritten in NumPy."""
    model = jax.tree.map(lambda x: np.asarray(x, np.float64), model)
    context = counts @ model.embed / max(counts.sum(), 1.0)
    features = np.concatenate(
        [model.embed[last], context, model.position[min(position, config.turn_length - 1)]]
    )
    logits = np.tanh(features @ model.w_hidden + model.b_hidden) @ model.w_out + model.b_out
    logits[EOS] += config.eos_bias
    logits[config.target_token] += config.target_bias
    logits[[PAD, USER]] = -np.inf
    top = logits.max()
    return logits - top - np.log(np.sum(np.exp(logits - top)))


def _check_dialogue(d, b, config, models):
    """Walks one dialogue turn by turn; returns its score and whether each turn hit EOS."""
    p = config.prompt_length
    prompt, response = d.tokens[b, :p], d.tokens[b, p:]
    mask, turn = d.assistant_mask[b], d.turn[b]
    length = np.sum(prompt != PAD)
    assert config.min_prompt_length <= length <= p
    np.testing.assert_array_equal(prompt[: p - length], PAD)  # left-padded
    assert np.all(prompt[p - length :] >= FIRST_ORDINARY)
    counts = np.bincount(prompt[prompt != PAD], minlength=config.vocab_size).astype(float)
    last, t, score, ended = prompt[-1], 0, 0.0, []
    for k in range(config.num_turns):
        if k > 0:
            assert response[t] == USER
            for j in range(config.user_length):
                assert not mask[t] and turn[t] == k and d.logprobs[b, t] == 0
                assert j == 0 or response[t] >= FIRST_ORDINARY
                counts[response[t]] += 1
                last, t = response[t], t + 1
        for position in range(config.turn_length):
            token = response[t]
            assert mask[t] and turn[t] == k and token not in (PAD, USER)
            for model, logprobs in (
                (models.policy, d.logprobs),
                (models.reference, d.ref_logprobs),
            ):
                expected = _np_logprobs(model, last, counts, position, config)[token]
                np.testing.assert_allclose(logprobs[b, t], expected, rtol=1e-4, atol=1e-4)
            score += config.turn_weights[k] * (token == config.target_token)
            counts[token] += 1
            last, t = token, t + 1
            if token == EOS:
                break
        ended.append(last == EOS)
    np.testing.assert_array_equal(response[t:], PAD)
    np.testing.assert_array_equal(mask[t:], False)
    np.testing.assert_array_equal(turn[t:], -1)
    np.testing.assert_array_equal(d.logprobs[b, t:], 0.0)
    assert d.truncated[b] == (not ended[-1])
    return score, ended


def test_dialogues_shapes_and_dtypes(dialogues):
    horizon = CONFIG.response_length
    assert CONFIG.length <= 64
    assert dialogues.tokens.shape == (BATCH, CONFIG.prompt_length + horizon)
    assert dialogues.tokens.dtype == np.int32 and dialogues.turn.dtype == np.int32
    for name in ("assistant_mask", "turn", "logprobs", "ref_logprobs"):
        assert getattr(dialogues, name).shape == (BATCH, horizon), name
    assert dialogues.assistant_mask.dtype == np.bool_ and dialogues.truncated.dtype == np.bool_
    assert dialogues.scores.shape == dialogues.truncated.shape == (BATCH,)
    assert dialogues.logprobs.dtype == dialogues.ref_logprobs.dtype == np.float32


def test_dialogues_follow_the_turn_structure_with_consistent_masks_flags_and_logprobs(dialogues):
    models = dialogue_models(CONFIG)
    turn_ends = []
    for b in range(BATCH):
        score, ended = _check_dialogue(dialogues, b, CONFIG, models)
        np.testing.assert_allclose(dialogues.scores[b], score, rtol=1e-6)
        turn_ends.append(ended)
    turn_ends = np.array(turn_ends)
    # The batch has turns that end at EOS and turns cut at the limit, in every position.
    assert np.all(turn_ends.any(axis=0)) and np.all((~turn_ends).any(axis=0))


def test_dialogues_are_sampled_from_the_models_given():
    models = dialogue_models(dataclasses.replace(CONFIG, seed=1))
    sample = jax.jit(sample_dialogues, static_argnames=("batch_size", "config"))
    given = jax.tree.map(np.asarray, sample(jax.random.key(0), 8, CONFIG, models))
    for b in range(8):
        _check_dialogue(given, b, CONFIG, models)


def test_dialogues_are_deterministic_for_a_key(dialogues):
    again = SAMPLE(jax.random.key(0), BATCH)
    jax.tree.map(np.testing.assert_array_equal, dialogues, jax.tree.map(np.asarray, again))
    other = SAMPLE(jax.random.key(1), BATCH)
    assert not np.array_equal(dialogues.tokens, other.tokens)


def test_scores_count_targets_in_assistant_turns_and_weigh_early_turns_most():
    target, other = CONFIG.target_token, CONFIG.target_token + 1
    #           assistant 0      | user 1         | assistant 1 | user 2 | assistant 2 | pad
    tokens = [other, target, EOS, USER, target, 5, 6, target, EOS, USER, 7, 8, 9, target, EOS, PAD]
    turn = [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, -1]
    mask = [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0]
    args = (np.array(tokens), np.array(turn), np.array(mask, bool))
    weights = CONFIG.turn_weights
    assert weights[0] > weights[1] > weights[2] > 0
    np.testing.assert_allclose(dialogue_scores(*args, CONFIG), sum(weights))
    # The user's target (position 4) never counts; dropping turn 0's costs the most.
    for position, turn_index in ((1, 0), (7, 1), (13, 2)):
        edited = np.array(tokens)
        edited[position] = other
        np.testing.assert_allclose(
            dialogue_scores(edited, *args[1:], CONFIG), sum(weights) - weights[turn_index]
        )


def test_scores_vary_with_what_was_said_in_the_first_turn_more_than_the_last(dialogues):
    response = dialogues.tokens[:, CONFIG.prompt_length :]
    hits = (response == CONFIG.target_token) & dialogues.assistant_mask
    first = np.sum(hits & (dialogues.turn == 0), axis=1)
    last = np.sum(hits & (dialogues.turn == CONFIG.num_turns - 1), axis=1)
    assert np.std(dialogues.scores) > 0.3
    assert np.corrcoef(first, dialogues.scores)[0, 1] > np.corrcoef(last, dialogues.scores)[0, 1]


def test_dialogue_batch_feeds_token_rewards_and_the_kl_penalty(dialogues):
    kl = valuefn.kl_penalty(dialogues.logprobs, dialogues.ref_logprobs, "k3")
    rewards = valuefn.token_rewards(dialogues.scores, dialogues.assistant_mask, kl=kl, kl_coef=0.1)
    kl_total = np.sum(np.where(dialogues.assistant_mask, kl, 0.0), axis=1)
    np.testing.assert_allclose(
        np.sum(rewards, axis=1), dialogues.scores - 0.1 * kl_total, rtol=1e-5, atol=1e-5
    )
    mean_kl = kl_total.sum() / dialogues.assistant_mask.sum()
    assert 0.0 < mean_kl < 0.5


def test_dialogue_config_rejects_bad_values():
    with pytest.raises(ValueError, match="turn_weights"):
        DialogueConfig(num_turns=2)
    with pytest.raises(ValueError, match="target_token"):
        DialogueConfig(target_token=EOS)
    with pytest.raises(ValueError, match="min_prompt_length"):
        DialogueConfig(min_prompt_length=9)
    with pytest.raises(ValueError, match="batch_size"):
        sample_dialogues(jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"\bkey\b"):
        sample_dialogues(0, 2)
    for field, value, message in [
        ("hidden_size", 2.5, "hidden_size must be an integer"),
        ("turn_weights", [1.0, 0.5, 0.25], "turn_weights must be a tuple"),
        ("eos_bias", float("nan"), "eos_bias must be a finite number"),
        ("seed", -1, "seed must be >= 0"),
        ("num_turns", 0, "num_turns must be >= 1"),
        ("turn_length", 0, "turn_length must be >= 1"),
        ("user_length", 0, "user_length must be >= 1"),
        ("hidden_size", 0, "hidden_size must be >= 1"),
        ("reference_noise", -0.05, "reference_noise must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            DialogueConfig(**{field: value})
