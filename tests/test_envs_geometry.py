"""Geometry: grader equivalences, generator determinism and verification, loader formats and
bad data, the calc_score env's episode flows, and tools/make_geometry.py."""

import io
import json
import subprocess
import sys
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sympy
from PIL import Image

from jaxrl_vl.envs.base import make_env, run_episode
from jaxrl_vl.envs.geometry import GeometryDataError, GeometryEnv, load_geometry3k
from jaxrl_vl.envs.geometry.generator import (
    TEMPLATES, GenerationError, format_answer, generate_problem, verify_spec,
)
from jaxrl_vl.envs.geometry.grader import (
    extract_boxed, extract_final_answer, grade_answer, grade_response, parse_answer,
)
from jaxrl_vl.envs.geometry.templates import Spec
from jaxrl_vl.envs.geometry.draw import Figure

REPO = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ grader


@pytest.mark.parametrize("predicted, reference", [
    ("2*sqrt(3)", r"2\sqrt{3}"), ("sqrt(12)", r"2\sqrt{3}"), (r"\sqrt{12}", r"2 \sqrt{3}"),
    ("2√3", r"2\sqrt{3}"), (r"2\sqrt3", r"2\sqrt{3}"), ("3.46", r"2\sqrt{3}"),
    ("3.5", r"2\sqrt{3}"), (r"\frac{14}{4}", r"\frac{7}{2}"), ("7/2", "3.5"), ("3.5", r"\frac{7}{2}"),
    (r"\dfrac{3}{5}", "0.6"), (r"\frac12", "0.5"), (r"\sqrt[3]{8}", "2"),
    (r"80^\circ", "80"), ("80°", "80"), ("80 degrees", "80"), ("x = 80", "80"), ("80.0", "80"),
    ("$80$", "80"), ("12 cm", "12"), (r"12 \text{ cm}^2", "12"), ("1,000", "1000"),
    ("17.32", "17.3"), (r"10\sqrt{3}", "17.3"), (r"16\pi", r"16 \pi"), ("50.3", r"16\pi"),
    ("2pi", r"2\pi"), (r"\left(\frac{1}{2}\right)", "0.5"), ("\x0crac{1}{2}", "0.5"),
])
def test_grader_accepts_equivalents(predicted, reference):
    assert grade_answer(predicted, reference).correct, grade_answer(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("3", r"2\sqrt{3}"), ("3.4", r"2\sqrt{3}"), ("3.47", r"2\sqrt{3}"), ("81", "80"),
    ("79.9", "80"), ("50", r"16\pi"), (r"\frac{7}{3}", r"\frac{7}{2}"), ("17.4", "17.3"),
    ("", "80"), (None, "80"), ("abc", "80"), ("__import__('os')", "1"), ("2**99999999", "1"),
    (r"\sqrt{-4}", "2"), ("1/0", "1"), ("(" * 300 + "1" + ")" * 300, "1"),
])
def test_grader_rejects_non_equivalents(predicted, reference):
    assert not grade_answer(predicted, reference).correct


def test_grader_maps_choice_letters():
    choices = ["12", r"6\sqrt{2}", "24", "8"]
    assert grade_answer("B", r"6\sqrt{2}", choices).correct
    assert grade_answer("(b)", r"6\sqrt{2}", choices).correct
    assert not grade_answer("A", r"6\sqrt{2}", choices).correct
    assert not grade_answer("B", r"6\sqrt{2}").correct  # no choices: a letter is just text


def test_extract_boxed_and_final_answer():
    assert extract_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\sqrt{\frac{a}{b}}}") == r"\sqrt{\frac{a}{b}}"
    assert extract_boxed("no box") is None and extract_boxed(r"\boxed{unclosed") is None
    assert extract_final_answer("work...\nAnswer: 42.") == "42"
    assert grade_response(r"<think>x</think> so \boxed{2\sqrt{3}}", "sqrt(12)").correct


def test_parse_answer_reports_decimal_places():
    assert parse_answer("17.30").decimal_places == 2
    assert parse_answer(r"2\sqrt{3}").decimal_places is None
    assert parse_answer(r"2\sqrt{3}").value == 2 * sympy.sqrt(3)


# --------------------------------------------------------------------------------- generator


def test_generator_is_deterministic_including_pixels():
    for index in (0, 5, 11):
        a, b = generate_problem(7, index), generate_problem(7, index)
        assert {k: v for k, v in a.items() if k != "images"} == \
            {k: v for k, v in b.items() if k != "images"}
        assert a["images"][0].tobytes() == b["images"][0].tobytes()
    assert generate_problem(7, 0)["answer"] != generate_problem(8, 0)["answer"] or \
        generate_problem(7, 0)["images"][0].tobytes() != generate_problem(8, 0)["images"][0].tobytes()


def test_generator_covers_all_templates_and_goals_with_valid_records():
    records = [generate_problem(3, i) for i in range(len(TEMPLATES))]
    assert {r["template"] for r in records} == set(TEMPLATES)
    assert {r["problem_type_goal"] for r in records} == {"Angle", "Length", "Area", "Ratio"}
    assert {r["problem_type_graph"] for r in records} >= {"Line", "Triangle", "Quadrilateral",
                                                          "Circle"}
    for r in records:
        assert r["problem"].startswith("<image>")
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        correct = [c for c in r["choices"] if grade_answer(c, r["answer"]).correct]
        assert correct == [r["choices"]["ABCD".index(r["ground_truth"])]]
        image = r["images"][0]
        assert image.size == (320, 320) and image.mode == "RGB"
        assert image.getextrema()[0][0] == 0  # something black was drawn


def test_verification_catches_a_wrong_answer():
    spec = Spec(Figure(), "Find x.", sympy.sqrt(2), recomputed=1.5, graph_type="Triangle",
                goal_type="Length")
    with pytest.raises(GenerationError, match="disagrees"):
        verify_spec(spec, format_answer(spec.answer, None), "test")
    good = Spec(Figure(), "Find x.", sympy.sqrt(2), recomputed=2 ** 0.5, graph_type="Triangle",
                goal_type="Length")
    verify_spec(good, format_answer(good.answer, None), "test")
    with pytest.raises(GenerationError, match="parses to"):
        verify_spec(good, "1.5", "test")


def test_format_answer_rounds_half_up_and_keeps_exact_forms():
    assert format_answer(sympy.Rational(1, 4), 1) == "0.3"
    assert format_answer(2 * sympy.sqrt(3), None) == r"2 \sqrt{3}"
    assert format_answer(sympy.Rational(15, 2), None) == r"\frac{15}{2}"


# ------------------------------------------------------------------------------------ loader


def _png_bytes(color="white"):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_loader_reads_hf_parquet_layout(tmp_path):
    rows = [{"images": [{"bytes": _png_bytes(), "path": None}], "problem": "<image>Find x.",
             "answer": r"2\sqrt{3}", "choices": ["1", "2", r"2\sqrt{3}", "4"], "id": "7"}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    (record,) = load_geometry3k(tmp_path, split="test")
    assert record["id"] == "7" and record["answer"] == r"2\sqrt{3}"
    assert record["images"][0].size == (20, 20) and len(record["choices"]) == 4


def test_loader_reads_save_to_disk_arrow_and_jsonl(tmp_path):
    table = pa.Table.from_pylist([{"images": [{"bytes": _png_bytes(), "path": "a.png"}],
                                   "problem": "p", "answer": 5, "choices": None}])
    (tmp_path / "train").mkdir()
    with pa.OSFile(str(tmp_path / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (record,) = load_geometry3k(tmp_path)
    assert record["answer"] == "5" and record["choices"] == []
    (tmp_path / "img.png").write_bytes(_png_bytes("black"))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"id": "j1", "images": ["img.png"], "problem": "p",
                                 "answer": "1"}) + "\n")
    assert load_geometry3k(jsonl)[0]["images"][0].getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("row, fragment", [
    ({"id": "r1", "problem": "p", "answer": "1"}, "missing field 'images'"),
    ({"id": "r2", "images": ["img.png"], "answer": "1"}, "missing field 'problem'"),
    ({"id": "r3", "images": ["missing.png"], "problem": "p", "answer": "1"}, "cannot decode image"),
    ({"id": "r4", "images": ["../img.png"], "problem": "p", "answer": "1"}, "without '..'"),
    ({"id": "r5", "images": ["bad.png"], "problem": "p", "answer": "1"}, "cannot decode image"),
    ({"id": "r6", "images": [], "problem": "p", "answer": "1"}, "'images' is empty"),
    ({"id": "r7", "images": ["img.png"], "problem": "p", "answer": " "}, "'answer'"),
])
def test_loader_reports_bad_records_with_ids(tmp_path, row, fragment):
    (tmp_path / "img.png").write_bytes(_png_bytes())
    (tmp_path / "bad.png").write_bytes(_png_bytes()[:30])  # truncated PNG
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(GeometryDataError) as info:
        load_geometry3k(path)
    assert fragment in str(info.value) and row["id"] in str(info.value)


def test_loader_reports_missing_split(tmp_path):
    with pytest.raises(GeometryDataError, match="no 'val' split"):
        load_geometry3k(tmp_path, split="val")


# --------------------------------------------------------------------------------------- env


def tool_call(answer):
    return ('<think>checking</think><tool_call>\n{"name": "calc_score", "arguments": {"answer": '
            + json.dumps(answer) + "}}\n</tool_call>")


def test_env_is_registered_and_opens_with_image_and_tool_schema():
    env = make_env("geometry", generator_seed=1)
    (message,) = env.reset(4)
    assert message["role"] == "user"
    assert message["content"][0]["type"] == "image"
    text = message["content"][-1]["text"]
    assert "calc_score" in text and "\\boxed" in text and "<image>" not in text
    assert env.tools[0]["function"]["name"] == "calc_score"


def test_env_tool_call_correct_ends_with_reward():
    env = GeometryEnv(generator_seed=2)
    env.reset(0)
    first = env.step(tool_call("-1"))
    assert (first.reward, first.done) == (0.0, False)
    assert first.messages[0]["role"] == "tool"
    assert "0.0" in first.messages[0]["content"] and "2 turns left" in first.messages[0]["content"]
    assert env.record["answer"] not in first.messages[0]["content"]
    second = env.step(tool_call(env.record["answer"]))
    assert (second.reward, second.done) == (1.0, True)
    assert second.info["turn_rewards"] == [0.0, 1.0] and second.info["answer_source"] == "tool"


def test_env_boxed_answer_ends_episode():
    env = GeometryEnv(generator_seed=2)
    env.reset(1)
    right = env.step(f"so the answer is \\boxed{{{env.record['answer']}}}")
    assert (right.reward, right.done, right.info["answer_source"]) == (1.0, True, "final")
    with pytest.raises(RuntimeError, match="already finished after 1 turn"):
        env.step("again")
    env.reset(1)
    wrong = env.step("\\boxed{-12345}")
    assert (wrong.reward, wrong.done) == (0.0, True)


def test_env_turn_cap_and_errors_as_observations():
    env = GeometryEnv(generator_seed=2, max_turns=3)
    env.reset(2)
    bad = env.step("<tool_call>{not json}</tool_call>")
    assert not bad.done and "invalid JSON" in bad.messages[0]["content"]
    unknown = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert not unknown.done and "unknown tool 'search'" in unknown.messages[0]["content"]
    last = env.step(tool_call("-1"))
    assert last.done and last.reward == 0.0 and last.info["turn_rewards"] == [0.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="already finished"):
        env.step("more")


def test_env_observation_role_user_for_templates_without_tools():
    env = GeometryEnv(generator_seed=2, observation_role="user")
    env.reset(0)
    assert env.step(tool_call("-1")).messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="observation_role"):
        GeometryEnv(observation_role="system")


def test_env_optional_calculator_tool():
    env = GeometryEnv(generator_seed=2, calculator=True)
    text = env.reset(0)[0]["content"][-1]["text"]
    assert "calculator" in text and [t["function"]["name"] for t in env.tools] == \
        ["calc_score", "calculator"]
    result = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}'
                      '</tool_call><tool_call>{"name": "calculator", "arguments": '
                      '{"expression": "__import__(os)"}}</tool_call>')
    assert not result.done and result.messages[0]["content"] == "12"
    assert "unknown function '__import__'" in result.messages[1]["content"]
    assert result.info["tool_errors"] == 1
    plain = GeometryEnv(generator_seed=2)
    plain.reset(0)
    assert "unknown tool 'calculator'" in plain.step(
        '<tool_call>{"name": "calculator", "arguments": {}}</tool_call>').messages[0]["content"]


def test_env_grades_only_one_calc_score_per_turn():
    env = GeometryEnv(generator_seed=2)
    env.reset(3)
    choices = env.record["choices"]
    result = env.step("".join(tool_call(c) for c in choices[::-1] if c != env.record["answer"])
                      + tool_call("-1") + tool_call(env.record["answer"]).replace("checking", ""))
    assert result.reward == 1.0  # the last call is the graded one
    env.reset(3)
    spam = env.step(tool_call(env.record["answer"]) + tool_call("-1"))
    assert spam.reward == 0.0 and any("ignored" in m["content"] for m in spam.messages)


def test_env_over_a_loaded_dataset_with_choices(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_geometry.py"), "--n", "12",
                             "--out", str(tmp_path), "--seed", "5"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["verified_records"] == 24 and len(summary["templates"]) == 12
    assert (tmp_path / "train.parquet").exists() and (tmp_path / "train.jsonl").exists()
    assert len(list((tmp_path / "images").glob("*.png"))) == 12
    env = make_env("geometry", data_path=str(tmp_path / "train.parquet"), show_choices=True)
    env.reset(6)
    assert "Choices: A." in env.reset(6)[0]["content"][-1]["text"]
    letter = env.record["ground_truth"]
    assert env.step(f"\\boxed{{{letter}}}").reward == 1.0
    again = make_env("geometry", data_path=str(tmp_path / "train.parquet"))
    assert again.records is env.records  # decoded once per process, shared read-only


def test_run_episode_with_a_scripted_policy():
    import asyncio

    env = GeometryEnv(generator_seed=9)
    replies = iter([tool_call("-1"), None])

    async def policy(messages):
        reply = next(replies)
        return reply if reply is not None else f"\\boxed{{{env.record['answer']}}}"

    episode = asyncio.run(run_episode(env, policy, seed=0))
    assert episode.rewards == [0.0, 1.0]
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool", "assistant"]
