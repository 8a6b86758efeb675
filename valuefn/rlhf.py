"""RLHF helpers: per-token KL penalties, token rewards, critic alignment, KL control.

In RLHF a response of ``T`` tokens is an episode of ``T`` steps: the state before
response token ``t`` is the prompt plus tokens ``0..t-1``, the action is token
``t``, and the reward is ``-kl_coef * KL_t`` on every generated token plus the
reward model's sequence score on the last one. The arrays here are time-last,
``[..., T]``, over the response part only, like the target kernels in
:mod:`valuefn.targets`; ``response_mask[..., t]`` is 1 on tokens the policy
generated (0 on padding and on user or tool tokens inside a multi-turn dialogue).

References:
  Ziegler et al., Fine-Tuning Language Models from Human Preferences, 2019;
  Ouyang et al., Training Language Models to Follow Instructions with Human
  Feedback, 2022; Schulman, Approximating KL Divergence, 2020
  (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from valuefn._checks import (
    as_real,
    check_broadcastable,
    check_positive,
    check_shape,
    check_unit_interval,
    concrete_or_none,
)

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Estimator = Literal["k1", "k2", "k3"]

ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: ArrayLike, ref_logprobs: ArrayLike, estimator: Estimator = "k1") -> Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the sampled tokens' log-probabilities.

    With the log-ratio ``l = log pi(a) - log pi_ref(a)`` of a token ``a ~ pi``:

    - ``k1 = l``: unbiased, high variance, negative for some tokens.
    - ``k2 = l^2 / 2``: biased (low bias for close policies), always >= 0.
    - ``k3 = (exp(-l) - 1) + l``: unbiased and always >= 0, because
      ``exp(-l) = pi_ref / pi`` has expectation 1 under ``pi`` and ``x - 1 >= log x``.

    Args:
      logprobs: ``[..., T]`` log-probabilities of the sampled tokens under the policy.
      ref_logprobs: same shape, under the reference policy.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      float32 ``[..., T]`` per-token KL estimates (no masking: mask them where used).

    References:
      Schulman, Approximating KL Divergence, 2020.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    logprobs = as_real("logprobs", logprobs)
    ref_logprobs = check_shape(
        "ref_logprobs", as_real("ref_logprobs", ref_logprobs), logprobs.shape
    )
    log_ratio = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(-log_ratio) + log_ratio


def _check_response_mask(response_mask: ArrayLike) -> Array:
    mask = as_real("response_mask", response_mask, allow_bool=True)
    if mask.ndim < 1 or mask.shape[-1] < 1:
        raise ValueError(
            f"response_mask must have the response tokens last, shape [..., T] with T >= 1; "
            f"got shape {mask.shape}"
        )
    return mask != 0


def _last_valid(valid: Array) -> tuple[Array, Array]:
    """Index of the last true entry on the last axis ``[...]`` int32, and whether any is."""
    horizon = valid.shape[-1]
    last = horizon - 1 - jnp.argmax(jnp.flip(valid, axis=-1), axis=-1)
    return last.astype(jnp.int32), jnp.any(valid, axis=-1)


def _is_last_valid(valid: Array) -> Array:
    """``[..., T]`` bool, true on the last true entry of each row."""
    last, has_any = _last_valid(valid)
    return (jnp.arange(valid.shape[-1]) == last[..., None]) & has_any[..., None]


def token_rewards(
    scores: ArrayLike,
    response_mask: ArrayLike,
    *,
    kl: ArrayLike | None = None,
    kl_coef: ArrayLike = 0.0,
    score_clip: ArrayLike | None = None,
) -> Array:
    """Per-token RLHF rewards: a KL penalty on every token and the score on the last.

    ``r_t = -kl_coef * kl_t`` on every valid token, plus
    ``clip(score, -score_clip, score_clip)`` on the last valid token of each
    sequence (the one that ends the response: EOS or the length limit). Valid
    tokens need not be contiguous, so right-padded responses, responses that fill
    the whole length and multi-turn masks with holes all work; a row with no
    valid token gets no score.

    Args:
      scores: ``[...]`` reward-model score of each sequence.
      response_mask: ``[..., T]`` bool or 0/1, 1 on tokens the policy generated.
      kl: optional ``[..., T]`` per-token KL estimates (see :func:`kl_penalty`);
        read on valid tokens only, so junk elsewhere is harmless.
      kl_coef: KL coefficient ``beta >= 0``, a scalar (traced is fine, e.g. from an
        adaptive controller) or broadcastable to ``[..., T]``.
      score_clip: if given (> 0), scores are clipped to ``[-score_clip, score_clip]``;
        a scalar, checked where known at trace time.

    Returns:
      float32 ``[..., T]`` rewards, 0 on masked tokens.

    References:
      Ziegler et al., Fine-Tuning Language Models from Human Preferences, 2019, eq. 2.
    """
    valid = _check_response_mask(response_mask)
    shape = valid.shape
    scores = check_shape("scores", as_real("scores", scores), shape[:-1]).astype(jnp.float32)
    if score_clip is not None:
        check_positive("score_clip", score_clip)
        clip = jnp.asarray(score_clip, jnp.float32)
        scores = jnp.clip(scores, -clip, clip)
    coef = check_broadcastable("kl_coef", as_real("kl_coef", kl_coef), shape)
    # Read as given: under jit jnp's copy of a Python number is traced.
    known_coef = concrete_or_none(kl_coef)
    if known_coef is not None and np.any(known_coef < 0):
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")

    is_last = _is_last_valid(valid)
    rewards = jnp.where(is_last, scores[..., None], 0.0)
    if kl is None:
        if known_coef is None or np.any(known_coef != 0):
            raise ValueError("kl_coef is set but kl is None: pass the per-token kl to penalise")
        return rewards
    kl = check_shape("kl", as_real("kl", kl), shape).astype(jnp.float32)
    # kl is zeroed first: junk there would otherwise send NaN gradients to kl_coef.
    penalty = jnp.where(valid, -coef.astype(jnp.float32) * jnp.where(valid, kl, 0.0), 0.0)
    return rewards + penalty


def response_discounts(
    gamma: ArrayLike, response_mask: ArrayLike, truncated: ArrayLike | None = None
) -> Array:
    """Per-token discounts of responses: the episode ends at the last valid token.

    ``gamma`` on every token, except 0 on the last valid token of a response that
    ended (with EOS). A response cut at the length limit (``truncated``) is not
    terminal: its last discount stays ``gamma`` so that the target bootstraps
    from the ``bootstrap_value`` of :func:`response_values`.

    Args:
      gamma: the per-token discount, a scalar in [0, 1]; checked where known at
        trace time, so that it may be traced (a sweep vmapped over gamma).
      response_mask: ``[..., T]`` bool or 0/1, 1 on tokens the policy generated.
      truncated: optional ``[...]`` bool, true where the response was cut.

    Returns:
      float32 ``[..., T]`` discounts for the target kernels.
    """
    if gamma is None or isinstance(gamma, bool) or np.ndim(gamma) != 0:
        raise ValueError(f"gamma must be a scalar in [0, 1], got {gamma!r}")
    check_unit_interval("gamma", gamma)
    valid = _check_response_mask(response_mask)
    is_last = _is_last_valid(valid)
    if truncated is not None:
        cut = as_real("truncated", truncated, allow_bool=True)
        cut = check_shape("truncated", cut, valid.shape[:-1])
        is_last = is_last & ~(cut != 0)[..., None]
    return jnp.where(is_last, 0.0, jnp.asarray(gamma, jnp.float32))


def response_values(
    critic_outputs: ArrayLike, prompt_length: int, response_mask: ArrayLike
) -> tuple[Array, Array]:
    """Aligns a critic run over prompt + response with the response's time steps.

    The critic reads the whole sequence ``[prompt (left-padded to P) | response
    (T tokens)]`` causally, so its output at position ``i`` is the value of the
    prefix of tokens ``0..i``. Response token ``t`` sits at position ``P + t`` and
    is generated from the state ``s_t`` made of every token before it (prompt +
    response tokens ``< t``), whose last position is ``P - 1 + t``. So the output
    at position ``i >= P - 1`` is ``V(s_{i - P + 1})``::

      position i:     0 ... P-2   P-1      P        P+1     ...  P+T-1
      token:          prompt      p_last   a_0      a_1     ...  a_{T-1}
      output at i:    (unused)    V(s_0)   V(s_1)   V(s_2)  ...  V(s_T)

    ``values[..., t] = critic_outputs[..., P - 1 + t] = V(s_t)`` for the state
    ``s_t`` = prompt + response tokens ``< t``, the convention of the target
    kernels. ``bootstrap_value[...] = critic_outputs[..., P + t_last]`` where
    ``t_last`` is the last valid response token: the state after the whole
    response, ``V(s_{t_last + 1})``. It matters only where the response was cut at
    the length limit without EOS (truncated, not terminal: pass it with a
    non-zero last discount); after EOS the last discount is 0 and it is ignored.
    In a multi-turn mask with holes, the value before the first token of a later
    assistant turn is the output at the last user token before it, as it should
    be: the state includes everything said so far.

    Args:
      critic_outputs: ``[..., P + T]`` critic outputs over prompt + response.
      prompt_length: ``P >= 1``, the static (Python int) padded prompt length.
      response_mask: ``[..., T]`` bool or 0/1, 1 on tokens the policy generated.

    Returns:
      ``(values, bootstrap_value)``: float32 ``[..., T]`` (0 on masked tokens) and
      float32 ``[...]`` (0 for a row with no valid token).
    """
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)):
        raise ValueError(f"prompt_length must be a Python int, got {prompt_length!r}")
    if prompt_length < 1:
        raise ValueError(
            f"prompt_length must be >= 1 (the first response token's value is read "
            f"at position prompt_length - 1), got {prompt_length}"
        )
    valid = _check_response_mask(response_mask)
    outputs = as_real("critic_outputs", critic_outputs)
    shape = valid.shape
    expected = shape[:-1] + (int(prompt_length) + shape[-1],)
    if outputs.shape != expected:
        raise ValueError(
            f"critic_outputs has shape {outputs.shape}, expected {expected} (response_mask "
            f"has shape {shape} and prompt_length is {prompt_length})"
        )
    outputs = outputs.astype(jnp.float32)

    start = int(prompt_length) - 1
    values = jnp.where(valid, outputs[..., start : start + shape[-1]], 0.0)
    last, has_any = _last_valid(valid)
    after_last = jnp.take_along_axis(outputs, (last + prompt_length)[..., None], axis=-1)[..., 0]
    return values, jnp.where(has_any, after_last, 0.0)


class KLControllerState(NamedTuple):
    """State of a KL controller."""

    kl_coef: Array  # [] float32, the current beta


class KLController(NamedTuple):
    """A KL coefficient schedule as a pair of pure functions (optax style).

    Attributes:
      init: ``() -> KLControllerState``.
      update: ``(state, kl, n_steps) -> KLControllerState``: ``kl`` is the observed
        mean KL of the last batch (a scalar), ``n_steps`` the number of samples it
        covered.
    """

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, ArrayLike, ArrayLike], KLControllerState]


def _positive(name: str, x: float, *, allow_zero: bool = False) -> float:
    value = concrete_or_none(x)
    if value is None or value.ndim != 0 or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {x!r}")
    return float(value)


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A constant KL coefficient; ``update`` returns the state unchanged.

    Args:
      kl_coef: ``beta >= 0``.
    """
    beta = _positive("kl_coef", kl_coef, allow_zero=True)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(beta, jnp.float32))

    def update(state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike) -> KLControllerState:
        del kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(
    init_kl_coef: float, target: float, horizon: float, *, max_error: float = 0.2
) -> KLController:
    """The adaptive KL coefficient of Ziegler et al. (2019), a proportional controller.

    After a batch of ``n_steps`` samples with mean KL ``kl``::

      e = clip(kl / target - 1, -max_error, max_error)
      kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    so ``beta`` rises while the KL is above ``target`` and falls while it is
    below, by at most ``max_error * n_steps / horizon`` relative per update.
    That bound must stay below 1, so that ``beta`` stays positive: a known
    ``n_steps`` at or past ``horizon / max_error`` raises a ``ValueError``; a
    traced one there, or a ``kl`` that is not finite (a NaN from a bad batch),
    leaves the state unchanged.

    Args:
      init_kl_coef: starting ``beta > 0`` (the updates multiply it).
      target: the KL to hold, > 0.
      horizon: the number of samples over which the error is corrected, > 0.
      max_error: clip on the proportional error, > 0 (0.2 in the paper).

    References:
      Ziegler et al., Fine-Tuning Language Models from Human Preferences, 2019, sec. 2.2.
    """
    beta = _positive("init_kl_coef", init_kl_coef)
    target = _positive("target", target)
    horizon = _positive("horizon", horizon)
    max_error = _positive("max_error", max_error)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(beta, jnp.float32))

    def update(state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike) -> KLControllerState:
        if np.ndim(n_steps) != 0:
            raise ValueError(f"n_steps must be a scalar, got shape {np.shape(n_steps)}")
        known_steps = concrete_or_none(n_steps)
        if known_steps is not None and not 0 <= known_steps * max_error < horizon:
            raise ValueError(
                f"n_steps must be >= 0 and below horizon / max_error = "
                f"{horizon / max_error:g} so that beta stays positive, got {n_steps!r}"
            )
        kl = jnp.asarray(kl, jnp.float32)
        steps = jnp.asarray(n_steps, jnp.float32)
        error = jnp.clip(kl / target - 1.0, -max_error, max_error)
        new = state.kl_coef * (1.0 + error * steps / horizon)
        usable = jnp.isfinite(kl) & (steps >= 0) & (steps * max_error < horizon)
        return KLControllerState(kl_coef=jnp.where(usable, new, state.kl_coef))

    return KLController(init, update)
