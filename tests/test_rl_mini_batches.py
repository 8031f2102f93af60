"""PPO mini-batches (rl.updates_per_step): one optimizer update per slice of the micro-batch axis."""
import numpy as np

from jaxrl_vl.train.rl_update import train_mini_batches


def test_one_update_per_mini_batch_and_drift_from_the_first():
    seen = []

    def step_fn(state, batch):
        seen.append(batch["input_ids"].copy())
        u = len(seen) - 1
        return state + 1, {"loss": np.float32(u), "drift_mean": np.float32(10 + u), "ratio_min": np.float32(1 - u),
                           "ratio_max": np.float32(1 + u), "loss_tokens": np.float32(5)}

    batch = {"input_ids": np.arange(6 * 2).reshape(6, 2)}  # 6 micro-batches: 3 updates of 2 micro-batches
    state, metrics = train_mini_batches(step_fn, 0, batch, updates=3)
    assert state == 3
    assert [s[:, 0].tolist() for s in seen] == [[0, 2], [4, 6], [8, 10]]
    assert metrics["train/loss"] == 1.0  # mean over the updates
    assert metrics["train/drift_mean"] == 10.0  # only the first update is on-policy
    assert metrics["train/ratio_min"] == -1.0 and metrics["train/ratio_max"] == 3.0
    assert metrics["train/updates"] == 3.0
    assert metrics["train/loss_tokens"] == 15.0  # counts add up


def test_rows_are_dealt_so_no_micro_batch_is_all_filler(tiny_model_dir):
    from jaxrl_vl import models
    from jaxrl_vl.data.collate import rl_micro_batches

    config, _ = models.load(tiny_model_dir)
    rows = []
    for i in range(5):  # 5 rows over 4 micro-batches of 8 (rows_multiple): 27 fillers
        ids = np.arange(10 + i, dtype=np.int32) % 50 + 1
        rows.append({"input_ids": ids, "loss_mask": np.ones(len(ids), np.float32),
                     "advantages": np.ones(len(ids), np.float32), "turn_ids": np.zeros(len(ids), np.int32),
                     "rollout_logprobs": np.zeros(len(ids), np.float32)})
    batch = rl_micro_batches(rows, config, num_micro_batches=4, rows_multiple=8)
    assert batch["input_ids"].shape[:2] == (4, 8)
    trained_rows = (batch["loss_mask"].sum(axis=-1) > 0).sum(axis=1)
    assert trained_rows.tolist() == [2, 1, 1, 1]
