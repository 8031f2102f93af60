"""Play one Maze2D episode with the BFS solver and write its frames and trajectory.

    python tools/maze_demo.py --size 9 --seed 3 --out DIR [--cell-px 25] [--action-format tuple]

Writes DIR/frame_000.png (the first observation) .. DIR/frame_NNN.png (after each step) and
DIR/trajectory.json (layout, solver actions, replies, positions, feedback, rewards). The last line
printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_vl.envs.maze2d import Maze2DEnv, format_action, solve  # noqa: E402


def run_demo(size: int, seed: int, out_dir: str, cell_px: int = 25, action_format: str = "tuple") -> dict:
    env = Maze2DEnv(size=size, cell_px=cell_px, action_format=action_format)
    env.reset(seed)
    plan = solve(env.layout)
    fits_cap = len(plan) <= env.max_turns
    if not fits_cap:
        # Still show the whole solution: replay with a cap just big enough for it.
        env = Maze2DEnv(size=size, cell_px=cell_px, action_format=action_format, max_steps=len(plan))
        env.reset(seed)
    os.makedirs(out_dir, exist_ok=True)
    frames = ["frame_000.png"]
    env.frame().save(os.path.join(out_dir, frames[0]))
    steps = []
    for i, action in enumerate(plan, start=1):
        reply = format_action(action, action_format)
        result = env.step(reply)
        frames.append(f"frame_{i:03d}.png")
        env.frame().save(os.path.join(out_dir, frames[-1]))
        steps.append({"action": list(action), "reply": reply, "agent": list(env.agent),
                      "env_feedback": result.info["env_feedback"], "reward": result.reward, "done": result.done})
    trajectory = {
        "size": size, "seed": seed, "cell_px": cell_px,
        "walls": ["".join("#" if v else "." for v in row) for row in env.layout.walls], "agent_start": list(env.layout.agent), "target": list(env.layout.target),
        "optimal_moves": len(plan) - 1, "step_cap": env.max_turns if fits_cap else None, "fits_step_cap": fits_cap,
        "ansi_start": Maze2DEnv.ansi_of(env.layout), "steps": steps, "frames": frames,
        "success": bool(steps[-1]["reward"] == 1.0),
    }
    with open(os.path.join(out_dir, "trajectory.json"), "w") as f:
        json.dump(trajectory, f, indent=1)
    return {"out": out_dir, "frames": len(frames), "optimal_moves": len(plan) - 1,
            "fits_step_cap": fits_cap, "success": trajectory["success"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a Maze2D solver episode as PNG frames + trajectory.json")
    parser.add_argument("--size", type=int, default=9, help="odd maze side incl. outer wall (9 easy, 11 hard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cell-px", type=int, default=25)
    parser.add_argument("--action-format", choices=("tuple", "keyword"), default="tuple")
    args = parser.parse_args(argv)
    print(json.dumps(run_demo(args.size, args.seed, args.out, args.cell_px, args.action_format)))


if __name__ == "__main__":
    main()
