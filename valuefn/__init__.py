"""valuefn: value functions (critics) for reinforcement learning and RLHF in JAX."""

from valuefn.losses import (
    clip_fraction,
    explained_variance,
    masked_mean,
    masked_whiten,
    value_loss,
)
from valuefn.networks import (
    MLPValue,
    TransformerValue,
    ValueHead,
    count_parameters,
    plain_autodiff,
)
from valuefn.rlhf import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
    kl_penalty,
    response_discounts,
    response_values,
    token_rewards,
)
from valuefn.rollout import (
    Environment,
    RolloutState,
    Trajectory,
    reset_envs,
    rollout,
)
from valuefn.targets import (
    discounted_returns,
    discounts,
    gae,
    lambda_returns,
    n_step_targets,
    td_errors,
    td_targets,
)
from valuefn.train import (
    Batch,
    ReturnNormalizer,
    ReturnStats,
    TrainState,
    init_train_state,
    make_epochs_step,
    make_update_step,
    predict,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Environment",
    "KLController",
    "KLControllerState",
    "MLPValue",
    "ReturnNormalizer",
    "ReturnStats",
    "RolloutState",
    "TrainState",
    "Trajectory",
    "TransformerValue",
    "ValueHead",
    "adaptive_kl_controller",
    "clip_fraction",
    "count_parameters",
    "discounted_returns",
    "discounts",
    "explained_variance",
    "fixed_kl_controller",
    "gae",
    "init_train_state",
    "kl_penalty",
    "lambda_returns",
    "make_epochs_step",
    "make_update_step",
    "masked_mean",
    "masked_whiten",
    "n_step_targets",
    "plain_autodiff",
    "predict",
    "reset_envs",
    "response_discounts",
    "response_values",
    "rollout",
    "td_errors",
    "td_targets",
    "token_rewards",
    "value_loss",
]
