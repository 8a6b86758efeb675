"""One whole training iteration of ``valuefn train``, end to end.

The job's jitted iteration (:func:`valuefn.job.make_iteration`) with its
default settings: sample a batch of dialogues, per-token KL and rewards, the
critic's values, GAE targets, then epochs x minibatches of update steps, all
in one call. Its floor is the critic's model FLOPs (one forward pass over the
batch for the values, and a training pass per epoch) over the float32 matmul
rate; sampling the dialogues is not counted, so the fraction also shows how
much of the iteration is not the critic's matrix work.
"""

from __future__ import annotations

import jax

import valuefn
from valuefn import job
from valuefn.bench.figures import Figure, measure, measure_many, timed
from valuefn.bench.hardware import MATMUL, transformer_flops

QUICK = job.TrainConfig(
    batch_size=8,
    num_epochs=1,
    num_minibatches=2,
    critic=job.CriticConfig(d_model=16, num_layers=1, num_heads=2),
)


def iteration_flops(config: job.TrainConfig) -> float:
    """Model FLOPs of one training iteration: the critic's forward passes and its updates."""
    shape = dict(
        d_model=config.critic.d_model,
        num_layers=config.critic.num_layers,
        seq_len=config.task.length,
        tokens=config.batch_size * config.task.length,
    )
    return transformer_flops(**shape, training=False) + config.num_epochs * transformer_flops(
        **shape
    )


def run(quick: bool) -> list[Figure]:
    """The default job's training iteration and its three stages (``quick``: tiny sizes)."""
    config = QUICK if quick else job.TrainConfig()
    optimizer = job.make_optimizer(config)
    graphdef, state = valuefn.init_train_state(job.make_critic(config), optimizer)
    iteration = jax.jit(job.make_iteration(config, graphdef, optimizer), donate_argnums=0)
    key = jax.random.key(config.seed)
    carry = {"state": state, "i": 0}

    def call():
        # The iteration donates its state: keep the newest.
        carry["i"] += 1
        carry["state"], metrics = iteration(carry["state"], jax.random.fold_in(key, carry["i"]))
        return metrics

    timing = measure(call, repeats=3 if quick else 10)
    return [
        *stage_split(config, repeats=3 if quick else 10),
        timed(
            f"train iteration {config.batch_size}x{config.task.length} "
            f"({config.num_epochs} epochs x {config.num_minibatches} minibatches, "
            f"d{config.critic.d_model} L{config.critic.num_layers})",
            timing,
            work=config.batch_size * config.task.length,
            work_unit="tokens",
            floor=MATMUL["float32"],
            floor_work=iteration_flops(config),
        ),
    ]


def stage_split(config: job.TrainConfig, *, repeats: int) -> list[Figure]:
    """Each stage of the iteration jitted on its own: rollout, targets, updates.

    The baseline of each is the three stages' total, so ``vs baseline`` is the
    inverse of the stage's share of the iteration.
    """
    optimizer = job.make_optimizer(config)
    graphdef, state = valuefn.init_train_state(job.make_critic(config), optimizer)
    stages = job.make_stages(config, graphdef, optimizer)
    rollout_fn, targets_fn = jax.jit(stages.rollout), jax.jit(stages.targets)
    key = jax.random.key(config.seed)
    rollout = rollout_fn(key)
    batch = targets_fn(state, rollout).batch
    carry = {"state": state}

    def update():
        carry["state"], metrics = stages.update(carry["state"], batch, key)
        return metrics

    timings = measure_many(
        {
            "rollout (sample dialogues, KL, token rewards)": lambda: rollout_fn(key),
            "targets (critic values, GAE)": lambda: targets_fn(carry["state"], rollout),
            "updates (epochs x minibatches)": update,
        },
        repeats=repeats,
    )
    total = sum(t.median for t in timings.values())
    tokens = config.batch_size * config.task.length
    return [
        timed(
            f"iteration stage: {name}",
            timing,
            baseline="sum of the three stages",
            baseline_median=total,
            work=tokens,
            work_unit="tokens",
        )
        for name, timing in timings.items()
    ]
