"""Episode packing for RL: first-fit decreasing bins (data/packing.py), merged rows whose M-RoPE positions
restart per episode (data/batching.merge_rows), the padding of a 64-episode Maze2D batch
(tools/rl_packing_report.py), and the packed RL step equal to the unpacked one for every aggregation."""
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxrl_vl import models
from jaxrl_vl.data import packing
from jaxrl_vl.data.batching import merge_rows, pack_rows
from jaxrl_vl.losses.policy import PolicyLossConfig
from jaxrl_vl.train.rl_step import make_rl_step
from rl_batches import build_micro_batches, score_logprobs
from jaxrl_vl.train.step import Forward
from jaxrl_vl.train.state import create_train_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import rl_packing_report  # noqa: E402




def test_first_fit_decreasing_respects_capacity_and_segment_cap():
    lengths = [2, 2, 2, 5, 8, 8, 8, 3, 1]
    rows = packing.pack_first_fit_decreasing(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(9))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and all(r == sorted(r) for r in rows)
    assert len(rows) == 4  # 39 tokens: the optimum; first fit in the given order needs 5
    assert len(packing.pack_first_fit(lengths, 10)) == 5
    capped = packing.pack_first_fit_decreasing([1] * 7, 10, max_items_per_bin=3)
    assert [len(r) for r in capped] == [3, 3, 1]
    with pytest.raises(ValueError, match="sequence 1 has 11 tokens > row_length 10"):
        packing.pack_first_fit_decreasing([3, 11], 10)
    assert packing.micro_batch_layout(12, 2048, 4096) == (6, 2)
    assert packing.micro_batch_layout(5, 2048, 1000) == (5, 1)  # at least one row per micro-batch
    assert packing.padding_fraction([6, 4], 10, num_rows=4) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def maze_rows(tiny_model_dir):
    """Six short offline Maze2D episodes (images on every turn) as RL training rows."""
    return rl_packing_report.maze_training_rows(tiny_model_dir, 6, seed=3, max_turns=3)


def test_merged_rows_restart_positions_per_episode(maze_rows, tiny_model_dir):
    config, _ = models.load(tiny_model_dir)
    merged = merge_rows(maze_rows[:3])
    assert merged["segment_ids"].tolist() == sum(([k + 1] * len(r["input_ids"]) for k, r in enumerate(maze_rows[:3])),
                                                 [])
    assert merged["image_grid_thw"].shape[0] == sum(r["image_grid_thw"].shape[0] for r in maze_rows[:3])
    for key in ("loss_mask", "rollout_logprobs", "advantages", "turn_ids"):
        np.testing.assert_array_equal(merged[key], np.concatenate([r[key] for r in maze_rows[:3]]))
    packed = models.make_batch([merged], config)["position_ids"][:, 0]
    separate = [models.make_batch([r], config)["position_ids"][:, 0] for r in maze_rows[:3]]
    np.testing.assert_array_equal(packed, np.concatenate(separate, axis=1))  # M-RoPE restarts per segment
    with pytest.raises(ValueError, match="'group_id' is per-row"):
        merge_rows([{**maze_rows[0], "group_id": np.int32(0)}, {**maze_rows[1], "group_id": np.int32(1)}])


def test_report_pads_a_64_episode_maze_batch_below_15_percent(tiny_model_dir, capsys):
    rows = rl_packing_report.maze_training_rows(tiny_model_dir, 64)
    report = rl_packing_report.padding_report(rows, row_tokens=2048, max_segments=8, tokens_per_micro_batch=4096)
    assert report["episodes"] == 64 and 70 <= report["tokens_min"] and report["tokens_max"] <= 530
    assert report["padding"] <= 0.15 < report["unpacked_padding"], report
    assert report["segments_per_row_max"] <= 8 and report["packed_rows"] * 2048 >= report["tokens_total"]


def _empty_row(template: dict, pad_id: int) -> dict:
    """A one-token row that trains nothing (segment 1, loss_mask 0): fills the packed batch to the
    unpacked batch's shape, so both run through one compiled step."""
    row = {k: np.zeros(1, np.asarray(v).dtype) for k, v in template.items() if k not in ("pixel_values",
                                                                                          "image_grid_thw")}
    row.update(input_ids=np.full(1, pad_id, np.int32), turn_ids=np.full(1, -1, np.int32),
               segment_ids=np.ones(1, np.int32))
    return row


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "sequence-mean-token-sum", "sum"])
def test_packed_step_equals_unpacked(maze_rows, tiny_model_dir, aggregation):
    """Loss, every metric and the gradients (SGD with learning rate 1: the update is -grad) of the packed
    batch equal the unpacked batch's within 1e-5; rollout logprobs = trainer's + noise so ratios clip."""
    config, params = models.load(tiny_model_dir)
    rows = [dict(r) for r in maze_rows]
    unpacked_batch = build_micro_batches(rows, config, num_micro_batches=1, length_multiple=512)
    scored = score_logprobs(config, params, {k: v[0] for k, v in unpacked_batch.items()})
    rng = np.random.default_rng(0)
    for b, row in enumerate(rows):
        noise = rng.normal(0, 0.15, len(row["input_ids"])).astype(np.float32)
        row["rollout_logprobs"] = (scored[b, :len(row["input_ids"])] + noise) * row["loss_mask"]
    packed = pack_rows(rows, row_length=512, max_segments_per_row=4)
    assert len(packed) < len(rows) and max(int(r["segment_ids"].max()) for r in packed) > 1
    packed += [_empty_row(packed[0], config.pad_token_id or 0)] * (len(rows) - len(packed))
    loss_config = PolicyLossConfig(aggregation=aggregation, max_segments_per_row=4, clip_eps_low=0.1,
                                   clip_eps_high=0.1, token_sum_divisor=64.0)
    step = make_rl_step(Forward(config), optax.sgd(1.0), optax.constant_schedule(1.0), loss_config, donate=False)
    state = create_train_state(params, optax.sgd(1.0), jax.random.PRNGKey(0))
    unpacked_state, unpacked = step(state, build_micro_batches(rows, config, num_micro_batches=1,
                                                               length_multiple=512))
    packed_batch = build_micro_batches(packed, config, num_micro_batches=1, length_multiple=512)
    assert packed_batch["input_ids"].shape == unpacked_batch["input_ids"].shape  # one compiled step for both
    packed_state, by_packing = step(state, packed_batch)
    assert float(unpacked["clip_fraction"]) > 0 and abs(float(unpacked["loss"])) > 1e-3
    for key in set(unpacked) - {"tokens"}:  # "tokens" counts the empty rows' one token each
        assert float(by_packing[key]) == pytest.approx(float(unpacked[key]), rel=1e-5, abs=1e-5), key
    grads = [[np.asarray(p0) - np.asarray(p1) for p0, p1 in zip(jax.tree.leaves(params), jax.tree.leaves(s.params))]
             for s in (packed_state, unpacked_state)]
    for got, want in zip(*grads):  # 1e-5 of the leaf's largest gradient ("sum" sums ~600 tokens: grads ~3)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
