"""Maze2D: VisGym rules on hand-built mazes, generation, solver optimality, rendering, parsing,
the registry and async helpers, the evaluator, and the demo / SFT-data tools."""

import asyncio
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_vl.envs import base
from jaxrl_vl.envs.maze2d import actions as A
from jaxrl_vl.envs.maze2d import (
    Maze2DEnv,
    demonstration,
    eval_layout_keys,
    eval_seeds,
    evaluate,
    format_action,
    layout_from_rows,
    parse_action,
    random_layout,
    render_frame,
    shortest_path,
    solve,
)
from jaxrl_vl.envs.maze2d.render import AGENT_RGB, FLOOR_RGB, TARGET_RGB, WALL_RGB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 7x7 hand-built maze: agent top-left, target bottom-right, one route.
HAND_ROWS = [
    "#######",
    "#A..#.#",
    "###.#.#",
    "#...#.#",
    "#.###.#",
    "#.....T",
    "#######",
]
HAND_ROWS[5] = "#....T#"
HAND = layout_from_rows(HAND_ROWS)
RIGHT, UP, LEFT, DOWN, STOP = "('move', 0)", "('move', 1)", "('move', 2)", "('move', 3)", "('stop', 'stop')"


def hand_env(**kwargs):
    env = Maze2DEnv(size=7, **kwargs)
    env.reset(0, layout=HAND)
    return env


def last_text(messages):
    return messages[-1]["content"][-1]["text"]


# ---------------------------------------------------------------------------------- rules


def test_walls_block_and_feedback_strings():
    env = hand_env()
    r = env.step(UP)
    assert env.agent == (1, 1) and r.info["env_feedback"] == "Cannot move into a wall."
    assert last_text(r.messages).startswith("Environment feedback: Cannot move into a wall.\n\nThis is step 2.")
    r = env.step(RIGHT)
    assert env.agent == (1, 2) and r.info["env_feedback"] == "Action executed successfully."
    assert r.reward == 0.0 and not r.done
    assert last_text(r.messages) == (
        "Environment feedback: Action executed successfully.\n\nThis is step 3. You are allowed to take 17 more steps."
    )


def test_stop_rewards_only_at_target_and_reaching_does_not_end():
    env = hand_env()
    r = env.step(STOP)
    assert r.done and r.reward == 0.0 and r.info["terminated"] and not r.info["success"] and r.messages == []
    env = hand_env()
    for action in solve(HAND)[:-1]:
        r = env.step(format_action(action))
        assert r.reward == 0.0 and not r.done
    assert env.agent == HAND.target  # on the target, still running
    r = env.step(STOP)
    assert r.done and r.reward == 1.0 and r.info["success"]
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(STOP)


def test_step_cap_truncates_without_reward():
    env = hand_env(max_steps=3)
    for _ in range(2):
        assert not env.step(UP).done
    r = env.step(UP)
    assert r.done and r.info["truncated"] and r.reward == 0.0 and r.messages == []
    assert Maze2DEnv(size=9).max_turns == 20 and Maze2DEnv(size=11).max_turns == 30


def test_progress_reward_is_potential_based_shaping():
    env = hand_env(progress_reward=0.1)
    start = env.optimal_moves
    assert env.step(UP).reward == 0.0  # into a wall: no move, no shaping
    assert env.step("no action here").reward == 0.0  # unparseable: no move
    assert env.step(RIGHT).reward == pytest.approx(0.1)  # one cell closer along the only route
    assert env.step(LEFT).reward == pytest.approx(-0.1)  # and back
    total = 0.0
    for action in solve(HAND):
        r = env.step(format_action(action))
        total += r.reward
    assert r.info["success"] and total == pytest.approx(1.0 + 0.1 * start)  # shaping telescopes to c * distance
    assert hand_env().step(RIGHT).reward == 0.0  # off by default: VisGym's sparse reward
    with pytest.raises(ValueError, match="progress_reward"):
        hand_env(progress_reward=-1.0)


def test_invalid_actions_use_a_step_with_visgym_feedback():
    env = hand_env()
    r = env.step("I think I should go somewhere")
    assert r.info["env_feedback"].startswith("Cannot parse action string") and r.info["env_feedback"].endswith(
        "so the action is invalid.")
    assert r.info["steps"] == 1 and not r.info["parsed"]
    assert env.step("('move', 7)").info["env_feedback"] == (
        "The action 7 is not in the valid action space of move so nothing is executed.")
    assert env.step("('jump', 1)").info["env_feedback"] == (
        "The action name 'jump' is not recognized in the available action space.")
    assert env.step("('move', 0, 1)").info["env_feedback"] == A.FEEDBACK_BAD_FORMAT
    assert env.step("('stop', 'please stop now')").info["env_feedback"].startswith("The action please stop now")
    assert env.agent == (1, 1) and env.steps_taken == 5


def test_first_turn_prompt_is_visgym_and_compact_prompt_is_short():
    env = Maze2DEnv(size=9)
    msgs = env.reset(3)
    assert [p["type"] for p in msgs[0]["content"]] == ["image", "text"]
    text = msgs[0]["content"][1]["text"]
    assert text.startswith("You are navigating a 9x9 maze. The maze consists of walls (gray) and paths (white).")
    assert text.endswith("- To stop: `('stop', 'stop')`\nThis is step 1. You are allowed to take 19 more steps.")
    compact = Maze2DEnv(size=9, prompt_style="compact", action_format="keyword").reset(3)[0]["content"][1]["text"]
    assert len(compact) < len(text) / 2 and "<action>X</action>" in compact
    with pytest.raises(ValueError, match="prompt_style"):
        Maze2DEnv(prompt_style="long")
    with pytest.raises(ValueError, match="cell_px"):
        Maze2DEnv(cell_px=3)


# ---------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("size", [5, 9, 11, 13])
def test_generated_mazes_are_perfect_with_opposite_corners(size):
    for seed in range(5):
        lay = random_layout(size, seed)
        w = lay.walls
        assert w.shape == (size, size) and w[0].all() and w[-1].all() and w[:, 0].all() and w[:, -1].all()
        rooms = ((size - 1) // 2) ** 2
        floor = int((w == 0).sum())
        assert floor == 2 * rooms - 1  # rooms plus the rooms-1 openings of a spanning tree
        seen = {lay.agent}
        stack = [lay.agent]
        while stack:  # every floor cell reachable
            r, c = stack.pop()
            for dr, dc in A.DIRECTION_TO_DELTA.values():
                n = (r + dr, c + dc)
                if w[n] == 0 and n not in seen:
                    seen.add(n)
                    stack.append(n)
        assert len(seen) == floor
        assert {lay.agent, lay.target} in [{(1, 1), (size - 2, size - 2)}, {(size - 2, 1), (1, size - 2)}]
    assert random_layout(size, 7).key() == random_layout(size, 7).key()
    assert len({random_layout(size, s).key() for s in range(20)}) > 10


def test_random_positions_are_distinct_floor_cells_and_reproducible():
    layouts = [random_layout(5, seed, "random") for seed in range(200)]
    for lay in layouts:
        assert lay.agent != lay.target and lay.walls[lay.agent] == 0 and lay.walls[lay.target] == 0
    assert random_layout(5, 3, "random").key() == layouts[3].key()
    assert len({(lay.agent, lay.target) for lay in layouts}) > 20  # not only corners
    assert random_layout(9, 4, "corners").key() == random_layout(9, 4).key()  # VisGym's stay the default
    with pytest.raises(ValueError, match="positions"):
        random_layout(5, 0, "center")


def test_training_env_never_draws_a_held_out_layout():
    """5x5 with random cells has ~170 layouts, so plain seeds often hit one of the 64 held-out ones."""
    held_out = eval_layout_keys(5, positions="random")
    plain = Maze2DEnv(size=5, positions="random")
    hits = sum(plain.reset(seed) is not None and plain.layout.key() in held_out for seed in range(300))
    assert hits > 10
    train = Maze2DEnv(size=5, positions="random", exclude_eval_layouts=True)
    keys = []
    for seed in range(300):
        train.reset(seed)
        assert train.layout.key() not in held_out
        keys.append(train.layout.key())
    assert [train.reset(s) and train.layout.key() for s in range(5)] == keys[:5]  # deterministic per seed
    evaluation = Maze2DEnv(size=5, positions="random")  # the held-out episodes themselves
    evaluation.reset(eval_seeds(1)[0])
    assert evaluation.layout.key() in held_out


def test_make_sft_data_small_maze_random_positions(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "tools/make_sft_data.py"), "--env", "maze2d", "--n", "40",
                    "--out", str(tmp_path), "--size", "5", "--positions", "random", "--max-steps", "8",
                    "--no-feedback", "--action-format", "keyword", "--prompt-style", "compact"],
                   capture_output=True, text=True, check=True, cwd=REPO)
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(records) == 40
    held_out = eval_layout_keys(5, positions="random")
    for r in records:
        assert random_layout(5, r["seed"], "random").key() not in held_out
        assert "Environment feedback" not in json.dumps(r["messages"])
        assert "allowed to take 7 more steps" in json.dumps(r["messages"][0])


def test_even_or_tiny_sizes_rejected():
    for bad in (8, 3, 10):
        with pytest.raises(ValueError, match="odd int >= 5"):
            Maze2DEnv(size=bad)


# ---------------------------------------------------------------------------------- solver


def brute_force_moves(walls, start, goal):
    """Length of the shortest simple path by exhaustive DFS (small grids only)."""
    best = [None]

    def dfs(cell, visited):
        if best[0] is not None and len(visited) - 1 >= best[0]:
            return
        if cell == goal:
            best[0] = len(visited) - 1
            return
        for dr, dc in A.DIRECTION_TO_DELTA.values():
            n = (cell[0] + dr, cell[1] + dc)
            if 0 <= n[0] < walls.shape[0] and 0 <= n[1] < walls.shape[1] and walls[n] == 0 and n not in visited:
                dfs(n, visited | {n})

    dfs(start, {start})
    return best[0]


def test_solver_is_optimal_against_brute_force_with_loops():
    rng = np.random.default_rng(0)
    for _ in range(40):
        walls = (rng.random((5, 5)) < 0.3).astype(np.int8)  # open grids have many loops
        free = list(zip(*np.nonzero(walls == 0)))
        if len(free) < 2:
            continue
        start, goal = (tuple(int(v) for v in free[i]) for i in rng.choice(len(free), 2, replace=False))
        path = shortest_path(walls, start, goal)
        expected = brute_force_moves(walls, start, goal)
        assert (None if path is None else len(path) - 1) == expected
        if path is not None:
            assert path[0] == start and path[-1] == goal
            assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in itertools.pairwise(path))


def test_solver_plays_every_generated_maze_to_reward_one():
    for size, seed in [(9, s) for s in range(10)] + [(11, 0), (11, 1)]:
        env = Maze2DEnv(size=size, max_steps=60)
        env.reset(seed)
        plan = solve(env.layout)
        assert plan[-1] == ("stop", "stop")
        for action in plan:
            r = env.step(format_action(action))
        assert r.done and r.reward == 1.0


# ---------------------------------------------------------------------------------- rendering


def px(image, cell, cell_px, offset=(2, 2)):
    return image.getpixel((cell[1] * cell_px + offset[1], cell[0] * cell_px + offset[0]))


def test_render_colours_at_agent_target_and_walls():
    img = render_frame(HAND, HAND.agent, 25)
    assert img.size == (175, 175) and img.mode == "RGB"
    assert px(img, (0, 0), 25) == WALL_RGB == (169, 169, 169)
    assert px(img, (1, 2), 25) == FLOOR_RGB
    assert px(img, HAND.target, 25) == TARGET_RGB and px(img, HAND.target, 25, (12, 12)) == TARGET_RGB
    assert px(img, HAND.agent, 25, (12, 12)) == AGENT_RGB  # disc centre
    assert px(img, HAND.agent, 25, (1, 1)) == FLOOR_RGB  # disc radius 6.25 leaves the corners white
    blue = np.all(np.asarray(img) == AGENT_RGB, axis=-1).sum()
    assert 100 < blue < 160  # area of a radius-6.25 disc is ~123 px
    small = render_frame(HAND, HAND.agent, 8)
    assert small.size == (56, 56) and px(small, HAND.agent, 8, (4, 4)) == AGENT_RGB
    with pytest.raises(ValueError, match="cell_px"):
        render_frame(HAND, HAND.agent, 2)


def test_visgym_target_hole_after_leaving_target():
    env = hand_env()
    for action in solve(HAND)[:-1]:
        env.step(format_action(action))
    assert px(env.frame(), HAND.target, 25, (12, 12)) == AGENT_RGB
    env.step(LEFT)
    hole = env.frame()
    assert px(hole, HAND.target, 25, (12, 12)) == FLOOR_RGB and px(hole, HAND.target, 25) == TARGET_RGB
    assert px(hand_env(target_hole=False).frame(), HAND.target, 25, (12, 12)) == TARGET_RGB


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("('move', 0)", ("move", 0)),
    ("I will go right. Action: `('move', 0)`", ("move", 0)),
    ("First ('move', 1) then ('move', 3)", ("move", 3)),  # two tuples: VisGym takes the last
    ("```python\n('stop', 'stop')\n```", ("stop", "stop")),
    ("(move, 2)", ("move", 2)),  # bare identifier quoted
    ("<think>maybe ('move', 1)</think><answer>('move', 2)</answer>", ("move", 2)),
    ("the (big) maze, ('move', 3).", ("move", 3)),
])
def test_tuple_parser_edge_cases(text, expected):
    assert parse_action(text).action == expected


@pytest.mark.parametrize("text", ["", "go right", "(((", "('move', 0", "{'move': 0}", "x" * 500])
def test_tuple_parser_garbage_reports_error(text):
    parsed = parse_action(text)
    assert parsed.action is None
    assert parsed.error is not None and len(parsed.error) < 300


def test_keyword_parser():
    assert parse_action("<action>left</action>", "keyword").action == ("move", 2)
    assert parse_action("<action>up</action> no, <action> DOWN </action>", "keyword").action == ("move", 3)
    assert parse_action("<action>stop</action>", "keyword").action == ("stop", "stop")
    assert parse_action("<action>jump</action>", "keyword").error == A.FEEDBACK_NO_KEYWORD
    assert parse_action("('move', 0)", "keyword").action is None
    with pytest.raises(ValueError, match="action_format"):
        parse_action("x", "json")


def test_keyword_env_episode():
    env = hand_env(action_format="keyword")
    for action in solve(HAND):
        r = env.step(format_action(action, "keyword"))
    assert r.reward == 1.0


# ---------------------------------------------------------------------------------- protocol


def test_registry_and_protocol():
    env = base.make_env("maze2d/hard", prompt_style="compact")
    assert isinstance(env, base.ChatEnv) and env.size == 11 and env.max_turns == 30
    assert base.make_env("maze2d", size=13).size == 13
    with pytest.raises(ValueError, match=r"unknown env 'mazes'.*maze2d/easy"):
        base.make_env("mazes")
    with pytest.raises(ValueError, match="already registered"):
        base.register_env("maze2d", lambda: None)


def test_visible_messages_keeps_last_k_images():
    env = hand_env()
    msgs = env.reset(0, layout=HAND)
    for a in (RIGHT, RIGHT, DOWN):
        msgs += [base.assistant_message(a), *env.step(a).messages]
    assert base.count_images(msgs) == 4
    vis = base.visible_messages(msgs, 2)
    assert base.count_images(vis) == 2 and base.count_images(msgs) == 4
    assert vis[0]["content"][0] == base.text_part(base.OMITTED_IMAGE_TEXT)
    assert vis[-1] is msgs[-1]


def test_async_episode_and_evaluator():
    envs = []

    def factory():
        envs.append(Maze2DEnv(size=9, keep_last_images=1))
        return envs[-1]

    async def oracle(messages):  # concurrency=1, so the newest env is the one being played
        assert base.count_images(messages) == 1
        return format_action(solve(envs[-1].layout, envs[-1].agent)[0])

    async def always_stop(messages):
        return STOP

    summary, episodes = asyncio.run(evaluate(oracle, factory, n_episodes=8, concurrency=1))
    assert [e.seed for e in episodes] == eval_seeds(8)
    assert summary["success_rate"] == summary["solvable_fraction"] > 0.5
    assert summary["success_rate_on_solvable"] == 1.0
    summary, _ = asyncio.run(evaluate(always_stop, lambda: Maze2DEnv(size=9), n_episodes=4))
    assert summary["success_rate"] == 0.0 and summary["mean_turns"] == 1.0


# ---------------------------------------------------------------------------------- tools


def test_demonstration_messages_alternate_and_end_with_stop():
    env = Maze2DEnv(size=9, verbalize=True)
    msgs = demonstration(env, 3, reasoning=True)
    roles = [m["role"] for m in msgs]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in itertools.pairwise(roles))
    assert msgs[-1]["content"].endswith("<answer>('stop', 'stop')</answer>")
    assert msgs[1]["content"].startswith("<think>I am at row 1, column 1; the target is at row 7, column 7.")
    assert demonstration(Maze2DEnv(size=9, max_steps=5), 3) is None  # 12 moves + stop > 5 turns


def test_maze_demo_tool_writes_frames(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools/maze_demo.py"), "--size", "9", "--seed", "3",
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True, cwd=REPO)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    traj = json.loads((tmp_path / "trajectory.json").read_text())
    assert summary["success"] and traj["success"]
    assert len(traj["frames"]) == len(traj["steps"]) + 1 == traj["optimal_moves"] + 2
    from PIL import Image

    first = Image.open(tmp_path / "frame_000.png")
    assert first.size == (225, 225)
    last = Image.open(tmp_path / traj["frames"][-1])
    assert px(last.convert("RGB"), tuple(traj["target"]), 25, (12, 12)) == AGENT_RGB


def test_make_sft_data_maze_records_load(tmp_path):
    from jaxrl_vl.data.sources import read_jsonl
    from jaxrl_vl.data.validation import check_record_schema, load_record_images

    subprocess.run([sys.executable, os.path.join(REPO, "tools/make_sft_data.py"), "--env", "maze2d", "--n", "6",
                    "--out", str(tmp_path), "--reasoning", "--n-test", "2", "--prompt-style", "compact"],
                   capture_output=True, text=True, check=True, cwd=REPO)
    records = read_jsonl(str(tmp_path / "train.jsonl"), on_bad_record="raise")
    assert len(records) == 6
    keys = eval_layout_keys(9)
    for r in records:
        check_record_schema(r)
        loaded = load_record_images(r)
        assert base.count_images(loaded["messages"]) == r["turns"]  # one frame per assistant turn
        assert random_layout(9, r["seed"]).key() not in keys
    assert len(read_jsonl(str(tmp_path / "test.jsonl"))) <= 2

    hist = tmp_path / "hist"
    subprocess.run([sys.executable, os.path.join(REPO, "tools/make_sft_data.py"), "--env", "maze2d", "--n", "2",
                    "--out", str(hist), "--history", "2", "--action-format", "keyword"],
                   capture_output=True, text=True, check=True, cwd=REPO)
    records = read_jsonl(str(hist / "train.jsonl"), on_bad_record="raise")
    assert all(base.count_images(r["messages"]) <= 2 and r["messages"][-1]["role"] == "assistant" for r in records)
    assert records[0]["messages"][-1]["content"].startswith("<action>") and records[0]["loss_on"] == "last"


def test_register_env_decorator_passes_kwargs():
    @base.register_env("test/maze-alias")
    def make(**kwargs):
        return Maze2DEnv(**kwargs)

    assert base.make_env("test/maze-alias", size=5, max_steps=4).max_turns == 4
    assert "test/maze-alias" in base.list_envs()
