"""Chat environments: the protocol and registry (base), Maze2D, classification, geometry."""

from jaxrl_vl.envs.base import (
    ChatEnv,
    Episode,
    StepResult,
    list_envs,
    make_env,
    register_env,
    reset_async,
    run_episode,
    step_async,
    visible_messages,
)

__all__ = [
    "ChatEnv",
    "Episode",
    "StepResult",
    "list_envs",
    "make_env",
    "register_env",
    "reset_async",
    "run_episode",
    "step_async",
    "visible_messages",
]
