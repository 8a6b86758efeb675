"""valuefn: value functions (critics) for reinforcement learning and RLHF in JAX."""

from valuefn.losses import (
    clip_fraction,
    explained_variance,
    masked_mean,
    masked_whiten,
    value_loss,
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

__version__ = "0.1.0"

__all__ = [
    "clip_fraction",
    "discounted_returns",
    "discounts",
    "explained_variance",
    "gae",
    "lambda_returns",
    "masked_mean",
    "masked_whiten",
    "n_step_targets",
    "td_errors",
    "td_targets",
    "value_loss",
]
