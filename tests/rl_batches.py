"""Test helpers: RL rows -> one device batch, and the trainer's logprobs of one micro-batch."""
import numpy as np

from jaxrl_vl.data.collate import rl_micro_batches, split_host_stats
from jaxrl_vl.train.rl_step import make_score_batches
from jaxrl_vl.train.step import Forward


def build_micro_batches(rows, config, **kwargs) -> dict:
    """data/collate.rl_micro_batches without its host statistics."""
    return split_host_stats(rl_micro_batches(rows, config, **kwargs))[0]


def score_logprobs(config, params, batch, *, loss_chunk_size=0, **sampling) -> np.ndarray:
    """The trainer's logprobs [B, L] of one micro-batch (make_score_batches on a stack of one)."""
    stacked = {k: np.asarray(v)[None] for k, v in batch.items()}
    return np.asarray(make_score_batches(Forward(config, loss_chunk_size=loss_chunk_size), **sampling)(
        params, None, stacked))[0]
