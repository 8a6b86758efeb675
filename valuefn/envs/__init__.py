"""Built-in environments: a chain MDP with known values and a synthetic RLHF dialogue task."""

from valuefn.envs.dialogue import (
    DialogueConfig,
    DialogueModels,
    Dialogues,
    dialogue_models,
    dialogue_scores,
    sample_dialogues,
)
from valuefn.envs.random_walk import (
    RandomWalkConfig,
    RandomWalkState,
    random_walk,
    random_walk_policy,
    random_walk_values,
)

__all__ = [
    "DialogueConfig",
    "DialogueModels",
    "Dialogues",
    "RandomWalkConfig",
    "RandomWalkState",
    "dialogue_models",
    "dialogue_scores",
    "random_walk",
    "random_walk_policy",
    "random_walk_values",
    "sample_dialogues",
]
