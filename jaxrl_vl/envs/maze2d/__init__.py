"""VisGym's Maze2D as a chat environment. Registered names:

- "maze2d": `Maze2DEnv(**kwargs)` (size=9 by default)
- "maze2d/easy": 9x9, 20 steps; "maze2d/hard": 11x11, 30 steps (other kwargs pass through)
"""

from jaxrl_vl.envs.base import register_env
from jaxrl_vl.envs.maze2d.actions import format_action, parse_action
from jaxrl_vl.envs.maze2d.demos import demonstration
from jaxrl_vl.envs.maze2d.env import Maze2DEnv, apply_action
from jaxrl_vl.envs.maze2d.evaluate import eval_layout_keys, eval_seeds, evaluate, summarize
from jaxrl_vl.envs.maze2d.generate import EASY_SIZE, HARD_SIZE, MazeLayout, layout_from_rows, random_layout
from jaxrl_vl.envs.maze2d.render import render_frame
from jaxrl_vl.envs.maze2d.solver import shortest_path, solve


def _easy(**kwargs) -> Maze2DEnv:
    return Maze2DEnv(size=EASY_SIZE, **kwargs)


def _hard(**kwargs) -> Maze2DEnv:
    return Maze2DEnv(size=HARD_SIZE, **kwargs)


register_env("maze2d", Maze2DEnv)
register_env("maze2d/easy", _easy)
register_env("maze2d/hard", _hard)

__all__ = [
    "Maze2DEnv",
    "MazeLayout",
    "apply_action",
    "demonstration",
    "eval_layout_keys",
    "eval_seeds",
    "evaluate",
    "format_action",
    "layout_from_rows",
    "parse_action",
    "random_layout",
    "render_frame",
    "shortest_path",
    "solve",
    "summarize",
]
