"""Breadth-first shortest paths on a Maze2D grid, and the demonstration actions they give."""

from __future__ import annotations

import collections

import numpy as np

from jaxrl_vl.envs.maze2d.actions import DIRECTION_TO_DELTA, Action
from jaxrl_vl.envs.maze2d.generate import MazeLayout, Position

STOP: Action = ("stop", "stop")


def shortest_path(walls: np.ndarray, start: Position, goal: Position) -> list[Position] | None:
    """Cells from start to goal inclusive (len = moves + 1), or None if unreachable.

    Ties are broken by VisGym's direction order (right, up, left, down), so the path is
    deterministic. `walls` int8 [H, W], 1 = wall; cells outside the grid count as walls.
    """
    height, width = walls.shape
    start, goal = tuple(start), tuple(goal)
    parent: dict[Position, Position | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [cell]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path[::-1]
        for dr, dc in DIRECTION_TO_DELTA.values():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < height and 0 <= nxt[1] < width and walls[nxt] == 0 and nxt not in parent:
                parent[nxt] = cell
                queue.append(nxt)
    return None


def path_to_moves(path: list[Position]) -> list[Action]:
    """Adjacent cells -> ('move', d) actions."""
    delta_to_direction = {v: k for k, v in DIRECTION_TO_DELTA.items()}
    moves = []
    for (r0, c0), (r1, c1) in zip(path, path[1:]):
        delta = (r1 - r0, c1 - c0)
        if delta not in delta_to_direction:
            raise ValueError(f"path cells {(r0, c0)} -> {(r1, c1)} are not adjacent")
        moves.append(("move", delta_to_direction[delta]))
    return moves


def solve(layout: MazeLayout, agent: Position | None = None) -> list[Action]:
    """Optimal action sequence from `agent` (default: the layout's start): moves then stop.

    Raises ValueError when the target cannot be reached (never for generated perfect mazes).
    """
    start = layout.agent if agent is None else agent
    path = shortest_path(layout.walls, start, layout.target)
    if path is None:
        raise ValueError(f"target {layout.target} is unreachable from {tuple(start)}")
    return [*path_to_moves(path), STOP]
