"""Maze generation, following VisGym's Maze2D: a perfect maze by Wilson's algorithm inside an
outer wall, with the agent and the target at opposite interior corners.

Grid convention (same as VisGym): `walls` is int8 [size, size], 1 = wall, 0 = floor; positions are
(row, col); rooms sit at odd (row, col); the outer ring is wall. `size` must be odd and >= 5.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EASY_SIZE = 9  # VisGym maze_2d/easy
HARD_SIZE = 11  # VisGym maze_2d/hard
# Assistant turns allowed per episode, as VisGym's Interactor caps them.
MAX_STEPS_BY_SIZE = {EASY_SIZE: 20, HARD_SIZE: 30}

Position = tuple[int, int]
POSITIONS = ("corners", "random")  # where the agent and the target start (random_layout)


@dataclasses.dataclass(frozen=True)
class MazeLayout:
    """One episode's static layout. `walls` int8 [size, size] (1 = wall)."""

    walls: np.ndarray
    agent: Position
    target: Position

    @property
    def size(self) -> int:
        return int(self.walls.shape[0])

    def key(self) -> bytes:
        """Hashable identity of the layout (used to keep eval mazes out of training data)."""
        return self.walls.astype(np.int8).tobytes() + bytes([*self.agent, *self.target])


def check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ValueError(f"maze size must be an odd int >= 5 (easy 9, hard 11), got size={size!r}")


def default_max_steps(size: int) -> int:
    """VisGym caps 9x9 at 20 and 11x11 at 30; other sizes scale the 11x11 cap by cell count."""
    check_size(size)
    return MAX_STEPS_BY_SIZE.get(size, max(20, round(30 * (size * size) / (HARD_SIZE * HARD_SIZE))))


def wilson_maze(size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform spanning tree over the rooms, by Wilson's loop-erased random walks.

    Returns walls int8 [size, size]. Rooms are (odd, odd) cells; the cell between two adjacent
    rooms is opened when the tree joins them.
    """
    check_size(size)
    walls = np.ones((size, size), dtype=np.int8)
    rooms = [(r, c) for r in range(1, size - 1, 2) for c in range(1, size - 1, 2)]
    steps = ((0, 2), (2, 0), (0, -2), (-2, 0))
    in_tree = np.zeros((size, size), dtype=bool)
    first = rooms[int(rng.integers(len(rooms)))]
    in_tree[first] = True
    walls[first] = 0
    for start in [rooms[i] for i in rng.permutation(len(rooms))]:
        if in_tree[start]:
            continue
        # Random walk until the tree is hit; remembering only the last exit from each room
        # erases loops implicitly.
        exit_step: dict[Position, tuple[int, int]] = {}
        cell = start
        while not in_tree[cell]:
            while True:
                dr, dc = steps[int(rng.integers(4))]
                nxt = (cell[0] + dr, cell[1] + dc)
                if 0 < nxt[0] < size - 1 and 0 < nxt[1] < size - 1:
                    break
            exit_step[cell] = (dr, dc)
            cell = nxt
        cell = start
        while not in_tree[cell]:
            dr, dc = exit_step[cell]
            in_tree[cell] = True
            walls[cell] = 0
            walls[cell[0] + dr // 2, cell[1] + dc // 2] = 0
            cell = (cell[0] + dr, cell[1] + dc)
    return walls


def corner_pairs(size: int) -> list[tuple[Position, Position]]:
    """The four (agent, target) choices at opposite interior corners, in VisGym's order."""
    lo, hi = 1, size - 2
    return [((lo, lo), (hi, hi)), ((hi, hi), (lo, lo)), ((hi, lo), (lo, hi)), ((lo, hi), (hi, lo))]


def random_layout(size: int, seed: int, positions: str = "corners") -> MazeLayout:
    """The episode layout for `seed`: same seed and size give the same maze on every machine.

    positions: "corners" (VisGym: agent and target at opposite interior corners) or "random"
    (two distinct random floor cells: shorter, more varied episodes, e.g. for small CPU runs).
    """
    check_size(size)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose one of {POSITIONS}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, size])
    walls = wilson_maze(size, rng)
    if positions == "corners":
        agent, target = corner_pairs(size)[int(rng.integers(4))]
    else:
        floor = np.argwhere(walls == 0)
        first, second = rng.choice(len(floor), size=2, replace=False)
        agent, target = tuple(int(v) for v in floor[first]), tuple(int(v) for v in floor[second])
    return MazeLayout(walls=walls, agent=agent, target=target)


def layout_from_rows(rows: list[str]) -> MazeLayout:
    """Build a layout from text rows ('#' wall, '.' or ' ' floor, 'A' agent, 'T' target).

    Used by tests and for hand-made mazes; the grid may be any rectangle but the env requires a
    square odd grid.
    """
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("rows must be a non-empty list of equal-length strings")
    walls = np.array([[1 if ch == "#" else 0 for ch in row] for row in rows], dtype=np.int8)
    found = {ch: (r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in "AT"}
    if set(found) != {"A", "T"}:
        raise ValueError("rows must contain exactly one 'A' (agent) and one 'T' (target)")
    return MazeLayout(walls=walls, agent=found["A"], target=found["T"])
