"""The training job behind ``valuefn train``: a critic for the dialogue task.

One training iteration is ONE jitted function, with no host round trip inside:

  sample dialogues -> per-token KL -> token rewards -> critic values and
  bootstrap -> GAE targets (no gradient) -> epochs x minibatches of updates.

It is pure in ``(state, key)``, so ``jax.vmap`` over seeds trains several
critics at once. :func:`run` drives it for the command line: progress bar,
``metrics.jsonl``, plots, checkpoints and the by-turn report.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from valuefn._checks import check_config, check_count, config_value
from valuefn.distributed import batch_sharding, shard_state
from valuefn.envs.dialogue import (
    PAD,
    DialogueConfig,
    Dialogues,
    dialogue_models,
    sample_dialogues,
)
from valuefn.losses import explained_variance, masked_mean
from valuefn.networks import TransformerValue
from valuefn.rlhf import kl_penalty, response_discounts, response_values, token_rewards
from valuefn.targets import discounted_returns, gae
from valuefn.train import Batch, TrainState, init_train_state, make_epochs_step, predict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """The critic: a :class:`valuefn.TransformerValue` over the whole dialogue.

    Attributes:
      d_model: width of the residual stream.
      num_layers: transformer blocks.
      num_heads: attention heads; must divide ``d_model``.
      remat, scan_layers: as :class:`valuefn.TransformerValue` takes them
        (``nnx.remat`` of each block; the blocks run by one ``nnx.scan``).
      mask_padding: the critic masks the task's ``PAD`` tokens
        (``pad_id=PAD``): the prompt's left padding and the padding after the
        dialogue are not attended to, and the real tokens are numbered from 0.
        Off by default: unmasked, each turn sits at the same positions in
        every dialogue, and the small default critic learned faster that way.
    """

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    remat: bool = False
    scan_layers: bool = False
    mask_padding: bool = False

    def __post_init__(self):
        check_config(self)
        for name in ("d_model", "num_layers", "num_heads"):
            check_count(name, getattr(self, name), numpy=False)
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the training job; every field can be set in a TOML file.

    Attributes:
      iterations: training iterations (rollout + epochs of updates each).
      seed: seeds the critic's initialisation and every iteration's samples.
      gamma: per-token discount.
      lam: GAE lambda.
      batch_size: dialogues per iteration.
      num_epochs: passes over each batch.
      num_minibatches: minibatches per pass; must divide ``batch_size``.
      learning_rate: AdamW step size.
      weight_decay: AdamW weight decay.
      max_grad_norm: global-norm gradient clip.
      clip_epsilon: PPO value clip range; 0 turns clipping off.
      kl_coef: weight of the per-token KL penalty in the rewards.
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      checkpoint_every: iterations between checkpoints (and one at the end).
      critic: the critic's shape.
      task: the dialogue task.
    """

    iterations: int = 120
    seed: int = 0
    gamma: float = 1.0
    lam: float = 0.95
    batch_size: int = 64
    num_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_epsilon: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    checkpoint_every: int = 50
    critic: CriticConfig = CriticConfig()
    task: DialogueConfig = DialogueConfig()

    def __post_init__(self):
        check_config(self)
        for name in ("iterations", "batch_size", "num_epochs", "num_minibatches"):
            check_count(name, getattr(self, name), numpy=False)
        # jax.random.key keeps 32 bits of a seed unless 64-bit types are enabled.
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} must divide batch_size={self.batch_size}"
            )
        for name in ("learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("clip_epsilon", "kl_coef", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}")


def config_from_dict(values: dict[str, Any], base: TrainConfig = TrainConfig()) -> TrainConfig:
    """``base`` with the entries of ``values`` (as read from TOML) replaced.

    The tables ``[critic]`` and ``[task]`` set the nested configs; lists become
    tuples. Unknown keys, and values of another type than the field's (a
    float for an int, a string for a number), raise ``ValueError`` naming them.
    """
    nested = {"critic": CriticConfig, "task": DialogueConfig}

    def replace(config, entries: dict[str, Any], where: str):
        types = typing.get_type_hints(type(config))
        unknown = sorted(set(entries) - set(types))
        if unknown:
            raise ValueError(f"unknown {where} key(s) {unknown}; known: {sorted(types)}")
        changes = {}
        for name, value in entries.items():
            if name in nested and where == "config":
                if not isinstance(value, dict):
                    raise ValueError(f"{name} must be a table, got {value!r}")
                value = replace(getattr(config, name), value, f"[{name}]")
            else:
                label = name if where == "config" else f"{where} {name}"
                value = config_value(label, value, types[name])
            changes[name] = value
        try:
            return dataclasses.replace(config, **changes)
        except TypeError as err:
            raise ValueError(f"bad {where} entry: {err}") from err

    return replace(base, values, "config")


def make_critic(config: TrainConfig) -> TransformerValue:
    """The job's critic, initialised from ``config.seed``."""
    return TransformerValue(
        config.task.vocab_size,
        d_model=config.critic.d_model,
        num_layers=config.critic.num_layers,
        num_heads=config.critic.num_heads,
        max_len=config.task.length,
        remat=config.critic.remat,
        scan_layers=config.critic.scan_layers,
        pad_id=PAD if config.critic.mask_padding else None,
        rngs=nnx.Rngs(config.seed),
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the config's learning rate and weight decay, after global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(config.learning_rate, weight_decay=config.weight_decay),
    )


def to_sequence_layout(x: Array, prompt_length: int) -> Array:
    """Places per-response-step ``[B, T]`` arrays at the critic's positions ``[B, P + T]``.

    Step t's value is the critic output at position ``P - 1 + t`` (the inverse
    of :func:`valuefn.response_values`); the other positions get 0.
    """
    return jnp.pad(x, ((0, 0), (prompt_length - 1, 1)))


class Rollout(NamedTuple):
    """One batch of dialogues with its per-token KL and rewards ``[B, T]``."""

    dialogues: Dialogues
    kl: Array
    rewards: Array


class Targets(NamedTuple):
    """The critic's view of a rollout: its values, GAE returns and realised returns."""

    values: Array  # [B, T] V(s_t) before the update
    returns: Array  # [B, T] GAE lambda-returns, the regression targets
    realised: Array  # [B, T] undiscounted return from each token on
    batch: Batch  # the targets placed at the critic's positions [B, P + T]


class Stages(NamedTuple):
    """The three stages of one iteration, each a pure function (jit them separately to time).

    Attributes:
      rollout: ``(key) -> Rollout``.
      targets: ``(state, rollout) -> Targets``.
      update: ``(state, batch, key) -> (state, metrics)``, epochs of minibatch steps.
    """

    rollout: Callable[[Array], Rollout]
    targets: Callable[[TrainState, Rollout], Targets]
    update: Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]


def make_stages(
    config: TrainConfig,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Stages:
    """The stages of :func:`make_iteration`; arguments as there."""
    task = config.task
    models = dialogue_models(task)
    prompt_length = task.prompt_length

    def rollout(key: Array) -> Rollout:
        dialogues = sample_dialogues(key, config.batch_size, task, models)
        if mesh is not None:
            dialogues = jax.lax.with_sharding_constraint(dialogues, batch_sharding(mesh))
        mask = dialogues.assistant_mask
        kl = kl_penalty(dialogues.logprobs, dialogues.ref_logprobs, config.kl_estimator)
        rewards = token_rewards(dialogues.scores, mask, kl=kl, kl_coef=config.kl_coef)
        return Rollout(dialogues, kl, rewards)

    def targets(state: TrainState, rollout: Rollout) -> Targets:
        tokens, mask = rollout.dialogues.tokens, rollout.dialogues.assistant_mask
        outputs = predict(graphdef, state.params, tokens, state.return_stats)
        values, bootstrap = response_values(outputs, prompt_length, mask)
        # The reward model scores every dialogue when its last turn ends, cut at the
        # length limit or not, so the episode ends there: nothing to bootstrap.
        discounts = response_discounts(config.gamma, mask)
        _, returns = gae(rollout.rewards, values, discounts, bootstrap, config.lam, mask=mask)
        # What the dialogue actually pays from each token on, undiscounted: a critic
        # whose discount is too small values early turns far below it.
        realised = discounted_returns(
            rollout.rewards, response_discounts(1.0, mask), bootstrap, mask=mask
        )
        batch = Batch(
            inputs=tokens,
            targets=to_sequence_layout(returns, prompt_length),
            mask=to_sequence_layout(mask, prompt_length).astype(jnp.float32),
            old_values=to_sequence_layout(values, prompt_length) if config.clip_epsilon else None,
        )
        return Targets(values, returns, realised, batch)

    update = make_epochs_step(
        graphdef,
        optimizer,
        num_epochs=config.num_epochs,
        num_minibatches=config.num_minibatches,
        clip_epsilon=config.clip_epsilon or None,
    )
    return Stages(rollout, targets, update)


def make_iteration(
    config: TrainConfig,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """Builds ``iteration(state, key) -> (state, metrics)``, one whole training iteration.

    The :func:`make_stages` in turn: rollout, targets, update. Pure and
    jittable; ``jax.vmap`` it over states and keys to train several critics at
    once. With a ``mesh`` the sampled batch is constrained to be split over it,
    so each device samples and trains on its own rows.

    Metrics: those of :func:`valuefn.make_epochs_step`, plus ``score_mean``,
    ``kl_mean``, ``return_mean``, ``explained_variance`` (of the critic's
    predictions for the fresh batch, before the update, against the GAE
    returns), and ``value_by_turn`` and ``return_by_turn`` ``[K]``: mean
    predicted value and mean realised (undiscounted) return over each assistant
    turn's tokens.
    """
    stages = make_stages(config, graphdef, optimizer, mesh=mesh)
    num_turns = config.task.num_turns

    def iteration(state: TrainState, key: Array) -> tuple[TrainState, dict[str, Array]]:
        key_sample, key_epochs = jax.random.split(key)
        rollout = stages.rollout(key_sample)
        targets = stages.targets(state, rollout)
        state, metrics = stages.update(state, targets.batch, key_epochs)

        dialogues, mask = rollout.dialogues, rollout.dialogues.assistant_mask
        in_turn = (dialogues.turn[..., None] == jnp.arange(num_turns)) & mask[..., None]

        def by_turn(x):
            return masked_mean(jnp.broadcast_to(x[..., None], in_turn.shape), in_turn, axis=(0, 1))

        metrics = dict(metrics)
        metrics.update(
            score_mean=jnp.mean(dialogues.scores),
            kl_mean=masked_mean(rollout.kl, mask),
            return_mean=masked_mean(targets.returns, mask),
            explained_variance=explained_variance(targets.values, targets.returns, mask),
            value_by_turn=by_turn(targets.values),
            return_by_turn=by_turn(targets.realised),
        )
        return state, metrics

    return iteration


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    host = jax.device_get(metrics)
    return {k: (np.asarray(v).tolist()) for k, v in host.items()}


def check_out(out: Path) -> None:
    """Raises ValueError where ``out`` holds a run's checkpoints, which a new run must not join."""
    from valuefn import checkpoint

    if checkpoint.latest_step(Path(out) / "checkpoint") is not None:
        raise ValueError(
            f"{str(out)!r} holds the checkpoints of a run; resume it, or write to another folder"
        )


def run(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Trains the critic for ``config.iterations`` and writes its results to ``out``.

    Files: ``config.json``, ``metrics.jsonl`` (one line per iteration),
    ``curves.png``, ``value_by_turn.png`` and ``checkpoint/``.

    Args:
      config: the job.
      out: output directory (created); for a new run it must hold no checkpoint.
      resume: continue from the checkpoint in ``out``.
      mesh: run data-parallel over this mesh (see :mod:`valuefn.distributed`).
      show_progress: draw a progress bar.

    Returns:
      The last iteration's metrics.
    """
    # Imported here: the jitted pieces above need only the core dependencies,
    # so the benchmarks run where orbax, rich and matplotlib are not installed.
    from valuefn import checkpoint, report

    out = Path(out)
    if not resume:
        check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(config)
    graphdef, state = init_train_state(make_critic(config), optimizer)
    start = 0
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if resume:
        state, start = checkpoint.restore(out / "checkpoint", state)
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        history = [json.loads(line) for line in lines[:start]]
    if mesh is not None:
        state = shard_state(state, mesh)
    iteration = jax.jit(make_iteration(config, graphdef, optimizer, mesh=mesh), donate_argnums=0)
    root_key = jax.random.key(config.seed)
    is_main = jax.process_index() == 0
    if is_main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        metrics_path.write_text("".join(json.dumps(line) + "\n" for line in history))
    with report.progress(config.iterations, start, enabled=show_progress and is_main) as advance:
        for i in range(start, config.iterations):
            began = time.perf_counter()
            state, metrics = iteration(state, jax.random.fold_in(root_key, i))
            line = {"iteration": i + 1, **_scalars(metrics), "seconds": time.perf_counter() - began}
            history.append(line)
            if is_main:
                with metrics_path.open("a") as log:
                    log.write(json.dumps(line) + "\n")
            advance(line)
            if (i + 1) % config.checkpoint_every == 0 or i + 1 == config.iterations:
                checkpoint.save(out / "checkpoint", state, i + 1)
    if is_main and history:
        report.plot_curves(history, out / "curves.png")
        report.plot_value_by_turn(history[-1], out / "value_by_turn.png")
    return history[-1] if history else {}
