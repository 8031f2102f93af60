"""Orbax checkpoint store: exact round trip of a TrainState and the data iterator state,
keep-K retention, and atomicity (a half-written checkpoint is never the latest)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from jaxrl_vl.train.checkpoints import CheckpointStore
from jaxrl_vl.train.optim import learning_rate_schedule, make_optimizer
from jaxrl_vl.train.state import create_train_state


def _optim_config(**kw):
    c = ConfigDict(dict(learning_rate=1e-2, schedule="cosine", warmup_steps=2, end_learning_rate_fraction=0.1,
                        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0))
    c.update(kw)
    return c


def _state(seed=0, lora=False):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"model": {"layers": {"w": jax.random.normal(keys[0], (2, 4, 3))},
                        "norm": {"weight": jnp.ones((3,))}}}
    lora_tree = {"model": {"layers": {"lora_A": jax.random.normal(keys[1], (2, 2, 3))}}} if lora else None
    optimizer, _ = make_optimizer(_optim_config(), total_steps=10)
    state = create_train_state(params, optimizer, keys[2], lora=lora_tree)
    # take two real updates so the Adam moments and count are non-trivial
    for _ in range(2):
        grads = jax.tree.map(lambda x: jnp.sin(x) * 0.1, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trained = optax.apply_updates(state.trainable, updates)
        state = state.replace(step=state.step + 1, opt_state=opt_state,
                              **({"params": trained} if not lora else {"lora": trained}))
    return state


def _assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


@pytest.mark.parametrize("lora", [False, True])
def test_round_trip_is_exact(tmp_path, lora):
    state = _state(lora=lora)
    store = CheckpointStore(str(tmp_path), every_steps=1, keep=2)
    data_state = {"next_index": 17, "epoch": 1, "rng": [3, 4]}
    assert store.save(2, state, data_state)
    store.wait()
    fresh = _state(seed=1, lora=lora)  # same structure, different values
    restored, restored_data, step = store.restore(fresh)
    store.close()
    assert step == 2 and restored_data == data_state
    _assert_bitwise_equal(restored, state)


def test_bytes_iterator_state_and_retention(tmp_path):
    state = _state()
    store = CheckpointStore(str(tmp_path), every_steps=2, keep=2, async_save=False)
    for step in range(1, 7):
        store.save(step, state, b'{"pos": %d}' % step)
    assert store.all_steps() == [4, 6]  # every 2 steps, keep the newest 2
    _, data_state, step = store.restore(state)
    assert step == 6 and data_state == b'{"pos": 6}'
    _, data_state, _ = store.restore(state, step=4)
    assert data_state == b'{"pos": 4}'
    store.close()


def test_unfinished_checkpoint_is_ignored(tmp_path):
    state = _state()
    store = CheckpointStore(str(tmp_path), every_steps=1, keep=3, async_save=False)
    store.save(1, state, {"i": 1})
    store.close()
    # what a SIGKILL mid-write leaves behind: an orbax temporary folder for step 2
    os.makedirs(os.path.join(tmp_path, "2.orbax-checkpoint-tmp-123", "state"))
    store = CheckpointStore(str(tmp_path), every_steps=1, keep=3)
    assert store.latest_step() == 1
    _, data_state, step = store.restore(state)
    assert step == 1 and data_state == {"i": 1}
    store.close()


def test_restore_without_checkpoint_fails_clearly(tmp_path):
    store = CheckpointStore(str(tmp_path), every_steps=1, keep=1)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        store.restore(_state())


def test_schedules_and_clipping():
    for kind in ("cosine", "linear", "constant"):
        schedule = learning_rate_schedule(_optim_config(schedule=kind, warmup_steps=4), total_steps=20)
        assert float(schedule(0)) == pytest.approx(1e-2 / 4)
        assert float(schedule(3)) == pytest.approx(1e-2)
        assert float(schedule(4)) == pytest.approx(1e-2)
        end = float(schedule(20))
        assert end == pytest.approx(1e-2 if kind == "constant" else 1e-3, rel=1e-4)
    with pytest.raises(ValueError, match="optim.schedule"):
        learning_rate_schedule(_optim_config(schedule="step"), 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        learning_rate_schedule(_optim_config(warmup_steps=11), 10)
    # clipping: a huge gradient yields the same first Adam step as a clipped one (direction only),
    # and weight decay skips vectors (norm weights)
    optimizer, _ = make_optimizer(_optim_config(warmup_steps=0, schedule="constant"), 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    state = optimizer.init(params)
    updates, _ = optimizer.update({"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}, state, params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0  # no decay on vectors
    assert float(jnp.abs(updates["w"]).max()) == pytest.approx(1e-2 * 0.01)  # decay on matrices
