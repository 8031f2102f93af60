"""Rendering of Maze2D frames with VisGym's colours and shapes (drawn with Pillow, no pygame).

White floor, gray walls, a full red target cell, a blue agent disc of radius cell_px/4 centred in
its cell. VisGym draws on a persistent canvas and erases the agent's previous disc with a white
disc, which leaves a white hole in the target once the agent has stood on it and moved away;
`target_hole=True` reproduces that frame exactly as the model sees it there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from jaxrl_vl.envs.maze2d.generate import MazeLayout, Position

FLOOR_RGB = (255, 255, 255)
WALL_RGB = (169, 169, 169)
TARGET_RGB = (255, 0, 0)
AGENT_RGB = (0, 0, 255)
VISGYM_CELL_PX = 25  # 9x9 -> 225x225, 11x11 -> 275x275
MIN_CELL_PX = 4  # below this the agent disc (radius cell_px/4) vanishes


def check_cell_px(cell_px: int) -> None:
    if not isinstance(cell_px, int) or cell_px < MIN_CELL_PX:
        raise ValueError(f"cell_px must be an int >= {MIN_CELL_PX}, got cell_px={cell_px!r}")


def _disc_box(pos: Position, cell_px: int) -> tuple[float, float, float, float]:
    centre_x = (pos[1] + 0.5) * cell_px
    centre_y = (pos[0] + 0.5) * cell_px
    radius = cell_px / 4
    # Pillow's ellipse box is inclusive of its last pixel, hence the -1 on the far edge.
    return (centre_x - radius, centre_y - radius, centre_x + radius - 1, centre_y + radius - 1)


def render_frame(
    layout: MazeLayout, agent: Position, cell_px: int = VISGYM_CELL_PX, target_hole: bool = False
) -> Image.Image:
    """RGB frame [size*cell_px, size*cell_px]. `agent` is the current position (row, col)."""
    check_cell_px(cell_px)
    size = layout.size
    cells = np.where(layout.walls[..., None] == 1, np.array(WALL_RGB, np.uint8), np.array(FLOOR_RGB, np.uint8))
    cells[layout.target] = TARGET_RGB
    pixels = np.repeat(np.repeat(cells.astype(np.uint8), cell_px, axis=0), cell_px, axis=1)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    if target_hole and tuple(agent) != tuple(layout.target):
        draw.ellipse(_disc_box(layout.target, cell_px), fill=FLOOR_RGB)
    draw.ellipse(_disc_box(agent, cell_px), fill=AGENT_RGB)
    assert image.size == (size * cell_px, size * cell_px)
    return image


def render_ansi(layout: MazeLayout, agent: Position) -> str:
    """VisGym's text view: '#' wall, ' ' floor, 'A' agent, 'T' target (plus an extra border)."""
    chars = np.where(layout.walls == 1, "#", " ").astype("<U1")
    chars[layout.target] = "T"
    chars[tuple(agent)] = "A"
    size = layout.size
    border = "#" * (size + 2)
    return "\n".join([border, *("#" + "".join(row) + "#" for row in chars), border])
