"""Maze2D as a chat environment (VisGym rules, Interactor-style turns).

Turn 1 is one user message: the frame, then the instructions and "This is step 1. You are allowed
to take N more steps.". Every later turn is the new frame, then "Environment feedback: <env
feedback>" and the step line. Reward is sparse: 1.0 when the agent says stop on the target, else
0. Reaching the target does not end the episode; `stop` does, and so does the step cap (VisGym's
Interactor: 20 steps on 9x9, 30 on 11x11). Unparseable replies use up a step, as in VisGym.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from jaxrl_vl.envs.base import Message, StepResult, image_part, text_part, user_message
from jaxrl_vl.envs.maze2d import actions as A
from jaxrl_vl.envs.maze2d.evaluate import eval_layout_keys
from jaxrl_vl.envs.maze2d.generate import (
    POSITIONS,
    MazeLayout,
    Position,
    check_size,
    default_max_steps,
    random_layout,
)
from jaxrl_vl.envs.maze2d.render import VISGYM_CELL_PX, check_cell_px, render_ansi, render_frame
from jaxrl_vl.envs.maze2d.solver import shortest_path

SKIP_SEED_STRIDE = 7_919_993  # next candidate seed when a training seed draws a held-out layout


def apply_action(walls, agent: Position, action: A.Action) -> tuple[Position, str, bool]:
    """One VisGym step on a parsed 2-tuple: (new agent position, env feedback, stopped)."""
    branch, payload = action
    if branch == "move":
        if not (isinstance(payload, int) and not isinstance(payload, bool) and payload in A.DIRECTION_TO_DELTA):
            return agent, A.feedback_bad_payload(branch, payload), False
        dr, dc = A.DIRECTION_TO_DELTA[payload]
        nxt = (agent[0] + dr, agent[1] + dc)
        inside = 0 <= nxt[0] < walls.shape[0] and 0 <= nxt[1] < walls.shape[1]
        if not inside or walls[nxt] == 1:
            return agent, A.FEEDBACK_WALL, False
        return nxt, A.FEEDBACK_OK, False
    if branch == "stop":
        # VisGym's stop space is Text(4): any string of at most 4 characters.
        if not (isinstance(payload, str) and len(payload) <= 4):
            return agent, A.feedback_bad_payload(branch, payload), False
        return agent, A.FEEDBACK_OK, True
    return agent, A.feedback_unknown_name(branch), False


class Maze2DEnv:
    """Chat env over VisGym's Maze2D. See module docstring for the turn format.

    Args:
      size: odd grid side including the outer wall (9 easy, 11 hard).
      max_steps: assistant turns per episode; default 20 for 9x9, 30 for 11x11.
      action_format: "tuple" (VisGym) or "keyword" (`<action>left</action>`).
      prompt_style: "visgym" (VisGym's full prompt) or "compact" (short, for small contexts).
      verbalize: ask for <think>…</think><answer>…</answer> (tuple format only).
      keep_last_images: None = the policy sees every frame; k = only the last k.
      cell_px: pixels per cell (25 as VisGym; smaller means fewer image tokens only when the
        processor's min pixel bound allows it).
      include_feedback: put "Environment feedback: ..." in later turns (VisGym flag).
      target_hole: reproduce VisGym's white hole in the target after the agent leaves it.
      positions: "corners" (VisGym) or "random" start and target cells (generate.random_layout).
      exclude_eval_layouts: training envs set this so that reset(seed) never lands on one of the
        held-out evaluation layouts (evaluate.eval_layout_keys): it moves on to the next candidate
        seed. Matters when the layout space is small (e.g. 5x5 with random positions).
      progress_reward: c > 0 adds potential-based shaping (Ng, Harada & Russell, 1999) to each turn's
        reward: c x (shortest-path distance to the target before the move - after it). A move into a
        wall or an unparseable reply earns 0, a step away -c; an episode's shaping sums to
        c x (start distance - end distance), so the best policy stays the same. `info["success"]`
        (what success rates count) is unchanged. For RL's dense signal; 0 = VisGym's sparse reward.
    """

    def __init__(
        self,
        size: int = 9,
        max_steps: int | None = None,
        action_format: str = "tuple",
        prompt_style: str = "visgym",
        verbalize: bool = False,
        keep_last_images: int | None = None,
        cell_px: int = VISGYM_CELL_PX,
        include_feedback: bool = True,
        target_hole: bool = True,
        positions: str = "corners",
        exclude_eval_layouts: bool = False,
        progress_reward: float = 0.0,
    ):
        check_size(size)
        self.size = size
        self.max_turns = default_max_steps(size) if max_steps is None else int(max_steps)
        if self.max_turns < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.action_format = action_format
        self.instructions = A.instructions(size, action_format, prompt_style, verbalize)
        if keep_last_images is not None and keep_last_images < 1:
            raise ValueError(f"keep_last_images must be None or >= 1, got {keep_last_images}")
        self.keep_last_images = keep_last_images
        check_cell_px(cell_px)
        self.cell_px = cell_px
        self.include_feedback = include_feedback
        self.target_hole = target_hole
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}: choose one of {POSITIONS}")
        self.positions = positions
        self.exclude_eval_layouts = exclude_eval_layouts
        if progress_reward < 0:
            raise ValueError(f"progress_reward must be >= 0, got {progress_reward}")
        self.progress_reward = float(progress_reward)
        self.layout: MazeLayout | None = None

    # -- state ------------------------------------------------------------------------------

    def reset(self, seed: int, layout: MazeLayout | None = None) -> list[Message]:
        """Start the episode for `seed` (or on a given layout, e.g. a hand-built maze)."""
        self.layout = self._layout_for(seed) if layout is None else layout
        if self.layout.size != self.size or self.layout.walls.shape != (self.size, self.size):
            raise ValueError(f"layout is {self.layout.walls.shape}, env size is {self.size}")
        self.seed = seed
        self.agent: Position = tuple(self.layout.agent)
        self.steps_taken = 0
        self.visited_target = False
        self.done = False
        # _distance: the agent's cell's, kept up to date by step() when progress_reward shapes the reward
        self.optimal_moves = self._distance = self._distance_to_target(self.agent)
        text = self.instructions + "\n" + A.step_line(0, self.max_turns)
        return [user_message(image_part(self.frame()), text_part(text))]

    def _layout_for(self, seed: int) -> MazeLayout:
        layout = random_layout(self.size, seed, self.positions)
        if self.exclude_eval_layouts:
            held_out = eval_layout_keys(self.size, positions=self.positions)
            candidate = seed
            while layout.key() in held_out:  # deterministic: the same seed always gives the same maze
                candidate += SKIP_SEED_STRIDE
                layout = random_layout(self.size, candidate, self.positions)
        return layout

    def _distance_to_target(self, cell: Position) -> int | None:
        path = shortest_path(self.layout.walls, cell, self.layout.target)
        return None if path is None else len(path) - 1

    def state_key(self) -> tuple:
        """What the next action depends on: the agent's cell and whether the target was visited (the
        frame shows a hole there after). Equal keys within a group = the same situation, for
        turn-level credit (losses/step_advantages.py)."""
        self._require_started()
        return (self.layout.key(), tuple(self.agent), self.visited_target)

    def frame(self) -> Image.Image:
        self._require_started()
        return render_frame(self.layout, self.agent, self.cell_px, self.target_hole and self.visited_target)

    def ansi(self) -> str:
        self._require_started()
        return render_ansi(self.layout, self.agent)

    @staticmethod
    def ansi_of(layout: MazeLayout) -> str:
        """The text view of a layout with the agent at its start."""
        return render_ansi(layout, layout.agent)

    def _require_started(self) -> None:
        if self.layout is None:
            raise RuntimeError("call reset(seed) before using the env")

    # -- step -------------------------------------------------------------------------------

    def step(self, assistant_text: str) -> StepResult:
        self._require_started()
        if self.done:
            raise RuntimeError("episode is over; call reset(seed)")
        parsed = A.parse_action(assistant_text, self.action_format)
        stopped = False
        before = self.agent
        if parsed.action is None:
            feedback = parsed.error
        else:
            self.agent, feedback, stopped = apply_action(self.layout.walls, self.agent, parsed.action)
        progress = 0.0
        if self.progress_reward and self.agent != before:
            before_distance, self._distance = self._distance, self._distance_to_target(self.agent)
            if None not in (before_distance, self._distance):  # a hand-built layout may wall the target off
                progress = self.progress_reward * (before_distance - self._distance)
        self.visited_target |= self.agent == tuple(self.layout.target)
        self.steps_taken += 1
        success = stopped and self.agent == tuple(self.layout.target)
        truncated = not stopped and self.steps_taken >= self.max_turns
        self.done = stopped or truncated
        info: dict[str, Any] = {
            "env_feedback": feedback,
            "action": parsed.action,
            "parsed": parsed.action is not None,
            "agent": self.agent,
            "target": tuple(self.layout.target),
            "steps": self.steps_taken,
            "terminated": stopped,
            "truncated": truncated,
            "success": success,
            "optimal_moves": self.optimal_moves,
            "max_steps": self.max_turns,
        }
        messages: list[Message] = []
        if not self.done:
            text = A.step_line(self.steps_taken, self.max_turns)
            if self.include_feedback:
                text = f"Environment feedback: {feedback}\n\n{text}"
            messages = [user_message(image_part(self.frame()), text_part(text))]
        return StepResult(messages=messages, reward=(1.0 if success else 0.0) + progress, done=self.done, info=info)
