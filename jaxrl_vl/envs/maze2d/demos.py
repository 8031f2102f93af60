"""Solver demonstrations: play an episode with optimal replies and keep the conversation.

The reply text matches the env's action format; with `reasoning=True` each reply first states
where the agent and target are and which way the shortest path goes, in VisGym's
`<think>…</think><answer>…</answer>` form (keyword format: `<think>…</think><action>…</action>`).
"""

from __future__ import annotations

from jaxrl_vl.envs.base import Message, assistant_message
from jaxrl_vl.envs.maze2d.actions import ACTION_TO_KEYWORD, Action, format_action
from jaxrl_vl.envs.maze2d.env import Maze2DEnv
from jaxrl_vl.envs.maze2d.solver import solve


def reasoning_text(agent: tuple[int, int], target: tuple[int, int], action: Action, moves_left: int) -> str:
    """One or two short sentences; positions are (row, col) counted from the top-left cell."""
    where = f"I am at row {agent[0]}, column {agent[1]}; the target is at row {target[0]}, column {target[1]}."
    if action[0] == "stop":
        return f"{where} I am on the target, so I stop."
    return f"{where} The open path goes {ACTION_TO_KEYWORD[tuple(action)]}; {moves_left} moves to go."


def reply_text(env: Maze2DEnv, action: Action, moves_left: int, reasoning: bool) -> str:
    answer = format_action(action, env.action_format)
    if not reasoning:
        return answer
    think = f"<think>{reasoning_text(env.agent, tuple(env.layout.target), action, moves_left)}</think>"
    if env.action_format == "keyword":
        return think + answer
    return f"{think}<answer>{answer}</answer>"


def demonstration(env: Maze2DEnv, seed: int, reasoning: bool = False, layout=None) -> list[Message] | None:
    """The full conversation (every frame kept) of an optimal episode, or None when the shortest
    path plus the stop does not fit in the env's step cap (such mazes cannot be solved there).

    Raises if the solver's episode does not end with reward 1, which would be a bug.
    """
    messages = env.reset(seed, layout=layout)
    plan = solve(env.layout)
    if len(plan) > env.max_turns:
        return None
    for i, action in enumerate(plan):
        reply = reply_text(env, action, moves_left=len(plan) - 1 - i, reasoning=reasoning)
        result = env.step(reply)
        messages += [assistant_message(reply), *result.messages]
        if result.info["action"] != tuple(action):
            raise AssertionError(f"reply {reply!r} parsed as {result.info['action']}, expected {action}")
    if not (result.done and result.reward == 1.0):
        raise AssertionError(f"solver episode for seed {seed} ended without success: {result.info}")
    return messages
