"""Tests for valuefn.rlhf against hand-built batches and plain NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import valuefn

RNG = np.random.default_rng(0)
ESTIMATORS = ("k1", "k2", "k3")

# Right-padded, full-length, all-masked and multi-turn (holes) rows, T = 5.
MASK = np.array(
    [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0],
    ],
    dtype=bool,
)
SCORES = np.array([2.0, -3.0, 7.0, 5.0, 0.5], np.float32)


def _last_valid(row):
    valid = np.flatnonzero(row)
    return valid[-1] if len(valid) else None


def _token_rewards_reference(scores, mask, kl, kl_coef, score_clip):
    rewards = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                rewards[b, t] -= kl_coef * (0.0 if kl is None else kl[b, t])
        last = _last_valid(mask[b])
        if last is not None:
            score = scores[b]
            if score_clip is not None:
                score = min(max(score, -score_clip), score_clip)
            rewards[b, last] += score
    return rewards


# --- kl_penalty --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "formula"),
    [
        ("k1", lambda lr: lr),
        ("k2", lambda lr: 0.5 * lr**2),
        ("k3", lambda lr: np.exp(-lr) - 1.0 + lr),
    ],
)
def test_kl_estimators_match_numpy_formulas(estimator, formula):
    logprobs = RNG.normal(-2.0, 1.0, (2, 3, 6)).astype(np.float32)
    ref_logprobs = RNG.normal(-2.0, 1.0, (2, 3, 6)).astype(np.float32)
    out = valuefn.kl_penalty(logprobs, ref_logprobs, estimator)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 6)
    expected = formula(logprobs.astype(np.float64) - ref_logprobs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_k3_and_k2_are_nonnegative_and_zero_at_equal_policies():
    log_ratio = np.concatenate([np.linspace(-30, 30, 601), RNG.normal(0, 1e-4, 100)])
    logprobs = (log_ratio - 1.0).astype(np.float32)
    ref = np.full_like(logprobs, -1.0)
    for estimator in ("k2", "k3"):
        assert np.all(np.asarray(valuefn.kl_penalty(logprobs, ref, estimator)) >= 0)
        np.testing.assert_array_equal(valuefn.kl_penalty(ref, ref, estimator), 0.0)


def test_k1_and_k3_are_unbiased_and_k2_is_close_for_near_policies():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.4, 0.35, 0.15, 0.10])
    exact = float(np.sum(p * np.log(p / q)))
    tokens = RNG.choice(len(p), size=200_000, p=p)
    logprobs, ref_logprobs = np.log(p)[tokens], np.log(q)[tokens]
    means = {e: float(jnp.mean(valuefn.kl_penalty(logprobs, ref_logprobs, e))) for e in ESTIMATORS}
    # Standard errors are about 1e-3 (k1) and 2e-4 (k3); k2's bias is O(KL^1.5).
    assert abs(means["k1"] - exact) < 5e-3
    assert abs(means["k3"] - exact) < 2e-3
    assert abs(means["k2"] - exact) < 0.2 * exact


def test_kl_penalty_rejects_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        valuefn.kl_penalty(np.zeros(3), np.zeros(3), "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        valuefn.kl_penalty(np.zeros((2, 3)), np.zeros((2, 4)))


# --- token_rewards -----------------------------------------------------------------------


def test_token_rewards_hand_built_batch():
    kl = np.arange(25, dtype=np.float32).reshape(5, 5) / 10.0
    rewards = valuefn.token_rewards(SCORES, MASK, kl=kl, kl_coef=0.5)
    # penalty -0.5 * kl = -0.05 * (5 b + t) on valid tokens; the score on the last one.
    expected = np.array(
        [
            [0.0, -0.05, -0.1 + 2.0, 0.0, 0.0],
            [-0.25, -0.3, -0.35, -0.4, -0.45 - 3.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [-0.75, -0.8, 0.0, 0.0, -0.95 + 5.0],
            [0.0, -1.05, -1.1 + 0.5, 0.0, 0.0],
        ]
    )
    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-6)


def test_token_rewards_without_kl_puts_the_score_on_the_last_valid_token_only():
    rewards = np.asarray(valuefn.token_rewards(SCORES, MASK))
    expected = np.zeros((5, 5))
    expected[0, 2], expected[1, 4], expected[3, 4], expected[4, 2] = 2.0, -3.0, 5.0, 0.5
    np.testing.assert_array_equal(rewards, expected)


@pytest.mark.parametrize("score_clip", [None, 1.0])
def test_token_rewards_match_numpy_loop_with_batch_axes(score_clip):
    mask = RNG.random((2, 3, 7)) < 0.6
    mask[0, 0] = False
    scores = RNG.normal(0, 2, (2, 3)).astype(np.float32)
    kl = RNG.normal(0, 1, (2, 3, 7)).astype(np.float32)
    out = valuefn.token_rewards(scores, mask, kl=kl, kl_coef=0.2, score_clip=score_clip)
    expected = _token_rewards_reference(
        scores.reshape(6), mask.reshape(6, 7), kl.reshape(6, 7), 0.2, score_clip
    )
    np.testing.assert_allclose(out, expected.reshape(2, 3, 7), rtol=1e-5, atol=1e-6)


def test_token_rewards_ignore_junk_kl_on_masked_tokens_and_accept_traced_coef():
    kl = np.where(MASK, 1.0, np.nan).astype(np.float32)

    @jax.jit
    def run(coef):
        return valuefn.token_rewards(SCORES, MASK.astype(np.int32), kl=kl, kl_coef=coef)

    out = np.asarray(run(jnp.float32(0.1)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(
        out, _token_rewards_reference(SCORES, MASK, np.nan_to_num(kl), 0.1, None), atol=1e-6
    )


def test_token_rewards_send_no_nan_gradient_to_kl_coef_from_masked_junk():
    def total(coef, fill):
        kl = np.where(MASK, 1.0, fill).astype(np.float32)
        return jnp.sum(valuefn.token_rewards(SCORES, MASK, kl=kl, kl_coef=coef))

    for fill in (np.nan, np.inf):
        assert float(jax.grad(total)(0.1, fill)) == pytest.approx(-MASK.sum())


def test_token_rewards_unbatched_sequence():
    out = valuefn.token_rewards(4.0, np.array([1, 1, 0]), kl=np.ones(3), kl_coef=1.0)
    np.testing.assert_allclose(out, [-1.0, 3.0, 0.0])


def test_token_rewards_reject_bad_arguments():
    with pytest.raises(ValueError, match="scores"):
        valuefn.token_rewards(np.zeros(4), MASK)
    with pytest.raises(ValueError, match="kl has shape"):
        valuefn.token_rewards(SCORES, MASK, kl=np.zeros((5, 4)), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        valuefn.token_rewards(SCORES, MASK, kl=np.zeros((5, 5)), kl_coef=-0.1)
    with pytest.raises(ValueError, match="kl_coef is set but kl is None"):
        valuefn.token_rewards(SCORES, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="score_clip"):
        valuefn.token_rewards(SCORES, MASK, score_clip=0.0)
    with pytest.raises(ValueError, match="response_mask"):
        valuefn.token_rewards(1.0, np.ones(()))


# --- response_values ---------------------------------------------------------------------


def test_response_values_hand_built_alignment():
    # P = 3, T = 5; critic_outputs[b, i] = 100 b + i names the position it was read from.
    outputs = 100.0 * np.arange(5)[:, None] + np.arange(8)[None, :]
    values, bootstrap = valuefn.response_values(outputs, 3, MASK)
    expected_values = np.array(
        [
            [2, 3, 4, 0, 0],
            [102, 103, 104, 105, 106],
            [0, 0, 0, 0, 0],
            [302, 303, 0, 0, 306],
            [0, 403, 404, 0, 0],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(bootstrap, [5.0, 107.0, 0.0, 307.0, 405.0])
    assert values.dtype == jnp.float32 and bootstrap.dtype == jnp.float32


def _prefix_value(prefix):
    """A causal 'critic': any function of the tokens read so far."""
    prefix = np.asarray(prefix, np.float64)
    return float(np.sum(np.sin(prefix + np.arange(len(prefix)))) + 0.1 * len(prefix))


def test_response_values_read_the_state_before_each_token_from_a_causal_critic():
    prompt_length, horizon = 4, 6
    prompts = np.array([[0, 0, 7, 8], [5, 6, 7, 9]])  # left-padded
    responses = RNG.integers(1, 20, (2, horizon))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1]], bool)
    tokens = np.concatenate([prompts, responses], axis=1)
    outputs = np.array([[_prefix_value(row[: i + 1]) for i in range(len(row))] for row in tokens])
    values, bootstrap = valuefn.response_values(outputs, prompt_length, mask)
    for b in range(2):
        for t in range(horizon):
            state = np.concatenate([prompts[b], responses[b, :t]])  # tokens before token t
            expected = _prefix_value(state) if mask[b, t] else 0.0
            np.testing.assert_allclose(values[b, t], expected, rtol=1e-5, atol=1e-5)
        last = _last_valid(mask[b])
        after = np.concatenate([prompts[b], responses[b, : last + 1]])
        np.testing.assert_allclose(bootstrap[b], _prefix_value(after), rtol=1e-5, atol=1e-5)


def test_response_values_under_jit_with_batch_axes():
    outputs = RNG.normal(size=(2, 3, 9)).astype(np.float32)
    mask = RNG.random((2, 3, 7)) < 0.5
    run = jax.jit(valuefn.response_values, static_argnums=1)
    values, bootstrap = run(outputs, 2, mask)
    for index in np.ndindex(2, 3):
        np.testing.assert_array_equal(values[index], np.where(mask[index], outputs[index][1:8], 0))
        last = _last_valid(mask[index])
        np.testing.assert_array_equal(
            bootstrap[index], 0.0 if last is None else outputs[index][2 + last]
        )


def test_response_values_reject_bad_arguments():
    outputs = np.zeros((5, 8))
    with pytest.raises(ValueError, match="prompt_length"):
        valuefn.response_values(outputs, 0, MASK)
    with pytest.raises(ValueError, match="prompt_length"):
        valuefn.response_values(outputs, 3.0, MASK)
    with pytest.raises(ValueError, match="critic_outputs"):
        valuefn.response_values(outputs, 2, MASK)
    with pytest.raises(ValueError, match="critic_outputs"):
        valuefn.response_values(np.zeros((4, 8)), 3, MASK)
    with pytest.raises(ValueError, match=r"critic_outputs .*prompt_length is 4"):
        valuefn.response_values(outputs, 4, MASK)


# --- response_discounts ------------------------------------------------------------------


def test_response_discounts_end_each_response_at_its_last_valid_token():
    g = 0.9
    expected = np.array(
        [
            [g, g, 0, g, g],
            [g, g, g, g, 0],
            [g, g, g, g, g],
            [g, g, g, g, 0],
            [g, g, 0, g, g],
        ],
        np.float32,
    )
    out = valuefn.response_discounts(g, MASK)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expected)
    truncated = np.array([False, True, False, False, True])
    expected[1, 4] = expected[4, 2] = g  # cut at the limit: not terminal
    np.testing.assert_array_equal(valuefn.response_discounts(g, MASK, truncated), expected)


def test_rlhf_pieces_fit_the_target_kernels_eos_ends_and_a_cut_bootstraps():
    # P = 2, T = 4; the first response ends with EOS, the second is cut at the limit.
    prompt_length, gamma = 2, 0.5
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    truncated = np.array([False, True])
    outputs = RNG.normal(size=(2, 6)).astype(np.float32)
    kl = RNG.normal(size=(2, 4)).astype(np.float32)
    scores = np.array([1.0, 2.0], np.float32)
    rewards = valuefn.token_rewards(scores, mask, kl=kl, kl_coef=0.1)
    values, bootstrap = valuefn.response_values(outputs, prompt_length, mask)
    discounts = valuefn.response_discounts(gamma, mask, truncated)
    targets = valuefn.td_targets(rewards, values, discounts, bootstrap, mask=mask)
    for b in range(2):
        length = int(mask[b].sum())
        for t in range(length):
            reward = -0.1 * kl[b, t] + (scores[b] if t == length - 1 else 0.0)
            # V(s_{t+1}) is the output at the position of token t: P + t.
            if t < length - 1 or truncated[b]:
                reward += gamma * outputs[b, prompt_length + t]
            np.testing.assert_allclose(targets[b, t], reward, rtol=1e-5, atol=1e-6)


def test_response_discounts_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\], got 1.5"):
        valuefn.response_discounts(1.5, MASK)
    with pytest.raises(ValueError, match="gamma must be a scalar"):
        valuefn.response_discounts(np.full(5, 0.9), MASK)
    with pytest.raises(ValueError, match="truncated"):
        valuefn.response_discounts(0.9, MASK, np.zeros(4, bool))


def test_gamma_and_score_clip_may_be_traced():
    # A sweep vmaps over gamma; a schedule passes score_clip into a jitted step.
    gammas = jnp.array([0.5, 0.9])
    swept = jax.vmap(lambda g: valuefn.response_discounts(g, MASK))(gammas)
    for g, discounts in zip(gammas, swept, strict=True):
        np.testing.assert_array_equal(discounts, valuefn.response_discounts(float(g), MASK))
    clipped = jax.jit(lambda c: valuefn.token_rewards(SCORES, MASK, score_clip=c))
    np.testing.assert_array_equal(
        clipped(jnp.float32(0.5)), valuefn.token_rewards(SCORES, MASK, score_clip=0.5)
    )


# --- KL controllers ----------------------------------------------------------------------


def test_fixed_kl_controller_never_changes():
    controller = valuefn.fixed_kl_controller(0.05)
    state = controller.init()
    for kl in (0.0, 1.0, 100.0):
        state = controller.update(state, kl, 256)
    assert float(state.kl_coef) == pytest.approx(0.05)


def test_adaptive_kl_controller_matches_the_paper_update():
    target, horizon = 6.0, 10_000.0
    controller = valuefn.adaptive_kl_controller(0.2, target, horizon)
    update = jax.jit(controller.update)
    for kl, n_steps in [(6.0, 512), (7.2, 512), (100.0, 256), (0.0, 1024), (5.1, 64)]:
        state = controller.init()
        new = update(state, kl, n_steps)
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        assert float(new.kl_coef) == pytest.approx(0.2 * (1 + error * n_steps / horizon), rel=1e-6)
    up = update(controller.init(), 12.0, 100)
    down = update(controller.init(), 3.0, 100)
    assert float(up.kl_coef) > 0.2 > float(down.kl_coef)


def test_adaptive_kl_controller_steers_the_kl_to_its_target():
    # A toy policy whose KL falls as the penalty rises: KL = 0.5 / beta.
    controller = valuefn.adaptive_kl_controller(0.01, target=2.0, horizon=1000.0)

    def body(state, _):
        kl = 0.5 / state.kl_coef
        return controller.update(state, kl, 100), kl

    final, kls = jax.lax.scan(body, controller.init(), None, length=1000)
    assert float(kls[0]) == pytest.approx(50.0)
    assert float(kls[-1]) == pytest.approx(2.0, rel=0.02)
    assert float(final.kl_coef) == pytest.approx(0.25, rel=0.02)


def test_adaptive_kl_controller_keeps_its_state_through_a_bad_batch():
    controller = valuefn.adaptive_kl_controller(0.2, target=6.0, horizon=1000.0)
    update = jax.jit(controller.update)
    start = controller.init()
    for kl, n_steps in [(np.nan, 64), (np.inf, 64), (0.0, 5000), (0.0, 8192), (1.0, -1)]:
        assert float(update(start, kl, n_steps).kl_coef) == pytest.approx(0.2)
    after = update(update(start, np.nan, 64), 6.0 * 1.1, 64)
    assert float(after.kl_coef) == pytest.approx(0.2 * (1 + 0.1 * 64 / 1000.0), rel=1e-6)


def test_kl_controllers_reject_bad_arguments():
    with pytest.raises(ValueError, match="kl_coef"):
        valuefn.fixed_kl_controller(-1.0)
    with pytest.raises(ValueError, match="target"):
        valuefn.adaptive_kl_controller(0.1, 0.0, 100.0)
    with pytest.raises(ValueError, match="horizon"):
        valuefn.adaptive_kl_controller(0.1, 1.0, -5.0)
    with pytest.raises(ValueError, match="init_kl_coef"):
        valuefn.adaptive_kl_controller(-0.1, 1.0, 5.0)
    with pytest.raises(ValueError, match="init_kl_coef"):
        valuefn.adaptive_kl_controller(0.0, 1.0, 5.0)  # the updates multiply it
    controller = valuefn.adaptive_kl_controller(0.1, 1.0, 1000.0)
    for n_steps in (5000, 8192, -1):
        with pytest.raises(ValueError, match="n_steps"):
            controller.update(controller.init(), 0.5, n_steps)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(controller.init(), 0.5, np.ones(2))
