"""Geometry with a calc_score tool: Geometry3k loader, offline generator, grader, env.

Importing this package registers the env as "geometry" (`make_env("geometry", ...)`).
"""

from jaxrl_vl.envs.base import register_env
from jaxrl_vl.envs.geometry.env import GeometryEnv
from jaxrl_vl.envs.geometry.generator import generate_problem, generate_problems
from jaxrl_vl.envs.geometry.grader import extract_boxed, extract_final_answer, grade_answer
from jaxrl_vl.envs.geometry.loader import GeometryDataError, load_geometry3k

register_env("geometry", GeometryEnv)

__all__ = ["GeometryDataError", "GeometryEnv", "extract_boxed", "extract_final_answer",
           "generate_problem", "generate_problems", "grade_answer", "load_geometry3k"]
