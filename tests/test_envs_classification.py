"""Digits image folder and the single-turn classification env."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_vl.data import digits
from jaxrl_vl.envs import base
from jaxrl_vl.envs.classification import QUESTION, answer_text, extract_answer, normalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    result = digits.write_image_folder(str(root), image_px=32)
    assert (result["train"], result["test"]) == (1438, 359)
    return str(root)


def test_split_is_disjoint_complete_and_deterministic():
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert np.array_equal(train, digits.split_indices("train"))
    assert not set(train) & set(test)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert not np.array_equal(digits.split_indices("test", seed=1), test)
    with pytest.raises(ValueError, match="split"):
        digits.split_indices("val")


def test_digit_image_is_rgb_upsampled_and_shows_the_digit():
    from sklearn.datasets import load_digits

    pixels = load_digits().images[0]
    arr = np.asarray(digits.digit_image(pixels, 64))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    # Nearest upsampling: each 8x8 block is one colour; ink (values >= 12) is darker than paper (0).
    assert (arr[:8, :8] == arr[0, 0]).all()
    ink = arr[np.repeat(np.repeat(pixels >= 12, 8, 0), 8, 1)].mean()
    paper = arr[np.repeat(np.repeat(pixels == 0, 8, 0), 8, 1)].mean()
    assert ink < paper - 100


def test_folder_layout(digits_root):
    for split in ("train", "test"):
        assert sorted(os.listdir(os.path.join(digits_root, split))) == sorted(digits.DIGIT_NAMES)
    meta = json.load(open(os.path.join(digits_root, "digits.json")))
    assert meta["image_px"] == 32


@pytest.mark.parametrize("reply, expected", [
    ("The subject in this photo is: seven", "seven"),
    ("The subject in this photo is: Seven.", "seven"),
    ("seven", "seven"),
    ("It could be 1: no, it is: nine\n", "nine"),
    ("The subject in this photo is:", ""),
])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_digits_env_rewards_right_class_only(digits_root):
    env = base.make_env("digits", root=digits_root, split="test")
    assert env.max_turns == 1
    msgs = env.reset(11)
    assert msgs[0]["content"][1] == {"type": "text", "text": QUESTION}
    assert msgs[0]["content"][0]["image"].size == (32, 32)
    label = env.current[2]
    r = env.step(answer_text(label))
    assert r.done and r.reward == 1.0 and r.info["success"] and r.messages == []
    env.reset(11)
    wrong = next(n for n in digits.DIGIT_NAMES if n != label)
    assert env.step(answer_text(wrong)).reward == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")


def test_in_memory_and_folder_envs_agree(digits_root):
    mem = base.make_env("digits", split="train", image_px=32)
    disk = base.make_env("digits", root=digits_root, split="train")
    for seed in (0, 500, 1437, 1438):
        a, b = mem.reset(seed), disk.reset(seed)
        assert mem.current[0] == disk.current[0]
        assert np.array_equal(np.asarray(a[0]["content"][0]["image"]), np.asarray(b[0]["content"][0]["image"]))


def test_format_hint_and_bad_args(digits_root):
    env = base.make_env("digits", split="test", format_hint=True)
    assert "The subject in this photo is: <name>" in env.reset(0)[0]["content"][1]["text"]
    with pytest.raises(ValueError, match="image_px"):
        base.make_env("digits", root=digits_root, image_px=64)
    with pytest.raises(FileNotFoundError, match="split folder"):
        base.make_env("image_folder", root=digits_root, split="val")
    assert normalize_name("Faces_easy") == "faces easy"


def test_run_episode_async(digits_root):
    env = base.make_env("image_folder", root=digits_root, split="test")

    async def says_seven(messages):
        return answer_text("seven")

    import asyncio

    rewards = [asyncio.run(base.run_episode(env, says_seven, s)).total_reward for s in range(0, 359, 10)]
    assert 0 < sum(rewards) < len(rewards)


def test_make_sft_data_digits_records_load(digits_root, tmp_path):
    from jaxrl_vl.data.sources import read_jsonl
    from jaxrl_vl.data.validation import check_record_schema, load_record_images

    out = subprocess.run([sys.executable, os.path.join(REPO, "tools/make_sft_data.py"), "--env", "digits",
                          "--out", str(tmp_path), "--root", digits_root, "--n", "20"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1])["test"] == 20
    records = read_jsonl(str(tmp_path / "test.jsonl"), on_bad_record="raise")
    assert len(records) == 20
    for r in records:
        check_record_schema(r)
        loaded = load_record_images(r)
        assert loaded["messages"][1]["content"] == answer_text(r["label"])
