"""Per-batch-shard vision inputs (models.inputs.make_batch num_shards=S): each shard of B/S contiguous rows
carries its own pixels and vision metadata with shard-local indices, padded to shapes all shards (and all
processes, vision_inputs.agree_shapes) share. The model's result does not depend on S or on the padding, and
on a mesh that splits the shard axis no collective moves pixels or image embeddings.

The sharded checks need fake CPU devices, which XLA_FLAGS must ask for before jax starts, so they run in a
fresh subprocess that prints one JSON line (as tests/test_sharding.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl import models
from jaxrl_vl.models.inputs import shard_grids
from jaxrl_vl.models.vision_inputs import agree_shapes, slot_shape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_vl import LAYOUT_A, LAYOUT_B, image_rows, spread_params, tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5


def _device_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "image_grid_thw"}


def test_make_batch_gives_each_shard_its_own_images():
    config = tiny_config()
    rows = image_rows(config, LAYOUT_B)
    batch = models.make_batch(rows, config, num_shards=2)
    shard_patches = [48 + 8 + 24, 0]
    P_s, D = batch["pixel_values"].shape[1:]
    assert batch["pixel_values"].shape[0] == 2 and P_s == max(shard_patches) and D == config.vision.patch_dim
    np.testing.assert_array_equal(batch["pixel_values"][0], np.concatenate([rows[0]["pixel_values"],
                                                                            rows[1]["pixel_values"]]))
    assert not batch["pixel_values"][1].any()  # the shard without images: all padding
    slots = batch["vision_slot_patches"]
    num_slots, slot_len = slots.shape[1:]
    assert (slots[1] == P_s).all() and (batch["vision_merged_rows"][1] == num_slots * slot_len // 4).all()
    # shard 0's indices are its own: every real patch row once, the rest padding
    np.testing.assert_array_equal(np.sort(slots[0][slots[0] < P_s]), np.arange(shard_patches[0]))
    assert all(v.shape[0] == 2 for k, v in batch.items() if k.startswith("vision_"))
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 6, 8], [1, 2, 4], [1, 4, 6]])  # host side, global
    # the shapes come from agree_shapes over the shards' grids, as a multi-host collate would compute them
    grids = shard_grids(rows, 2)
    assert agree_shapes(config.vision, grids) == (P_s, slot_shape(config.vision, *grids))
    assert slot_shape(config.vision, *grids) == (num_slots, slot_len, 0, True)
    # one shard (the default): a leading axis of 1 holding every image
    single = models.make_batch(rows, config)
    assert single["pixel_values"].shape == (1, sum(shard_patches), D)
    with pytest.raises(ValueError, match="num_shards=3 must be >= 1 and divide the 4 rows"):
        models.make_batch(rows, config, num_shards=3)
    with pytest.raises(ValueError, match="real patches in batch shard 0"):
        models.make_batch(rows, config, num_shards=2, pad_patches_to=64)


def test_agree_shapes_across_processes_equals_one_process_holding_every_shard():
    """Two threads stand in for two processes, each holding two shards; reduce_max exchanges their vectors. One
    process has only small same-size frames, the other large ones of two sizes: alone they would pick different
    slot lengths, agreed they get the shapes one process with all four shards computes."""
    for arch in ("qwen3_vl", "qwen2_5_vl"):
        vision = tiny_config(arch).vision
        local = [[np.array([[1, 4, 4]] * 3), np.array([[1, 4, 4]])],
                 [np.array([[1, 8, 12], [1, 16, 16]]), np.zeros((0, 3), np.int64)]]
        barrier, posted, agreed = threading.Barrier(2), [None, None], [None, None]

        def reduce_max(vector, rank):
            posted[rank] = vector
            barrier.wait()
            out = np.maximum(posted[0], posted[1])
            barrier.wait()  # both read before the next round overwrites
            return out

        def process(rank):
            agreed[rank] = agree_shapes(vision, local[rank], reduce_max=lambda v: reduce_max(v, rank))

        threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        want = agree_shapes(vision, local[0] + local[1])
        assert agreed[0] == agreed[1] == want, arch
        assert agree_shapes(vision, local[0]).slots.slot_len < want.slots.slot_len  # alone: another layout
        assert want.num_patches == 8 * 12 + 16 * 16 == 352 and want.slots.packed


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_logits_do_not_depend_on_shards_or_their_padding(arch):
    """One device: S = 2 shards, both with images (shard 1 with fewer patches), padded to more patches and slots
    than they need (as agreed with another process), give the logits of S = 1."""
    config = tiny_config(arch)
    params = spread_params(config)
    rows = image_rows(config, LAYOUT_A)
    shapes = agree_shapes(config.vision, shard_grids(rows, 2))
    bigger = shapes.slots._replace(num_slots=shapes.slots.num_slots + 2)
    one = models.make_batch(rows, config)
    two = models.make_batch(rows, config, num_shards=2, pad_patches_to=shapes.num_patches + 16, vision_slots=bigger)
    assert shapes.num_patches == 72 and two["pixel_values"].shape[:2] == (2, 88)
    forward = jax.jit(lambda p, b: models.apply(p, b, config))
    want, got = (np.asarray(forward(params, _device_batch(b))) for b in (one, two))
    real = one["segment_ids"] > 0
    assert np.abs(want[real]).max() > 1.0
    np.testing.assert_allclose(got[real], want[real], atol=TOLERANCE, rtol=0)


SHARDED_CHECK = textwrap.dedent(r'''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrl_vl import models, sharding
    from jaxrl_vl.activation_sharding import traced_under_mesh
    from jaxrl_vl.models.inputs import shard_grids
    from jaxrl_vl.models.vision_inputs import agree_shapes
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from hlo_collectives import collectives
    from tiny_vl import LAYOUT_B, image_rows, spread_params, tiny_config
    assert jax.device_count() == 8

    config = tiny_config()
    params = spread_params(config)

    def loss(p, b):  # weighted next-token cross-entropy; the logits ride along
        logits = models.apply(p, b, config)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], axis=-1)[..., 0]
        weights = b["weights"] * (b["segment_ids"] > 0)
        return -jnp.sum(logp * weights) / jnp.sum(weights), logits
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def batches(rows, num_shards):
        # the batch at the agreed shapes, and again padded to 16 more patches and 2 more slots per shard (as if
        # another process had bigger images): two programs that differ only in their vision shapes
        shapes = agree_shapes(config.vision, shard_grids(rows, num_shards))
        more = dict(pad_patches_to=shapes.num_patches + 16,
                    vision_slots=shapes.slots._replace(num_slots=shapes.slots.num_slots + 2))
        return [{k: v for k, v in models.make_batch(rows, config, pad_to_length=32, num_shards=num_shards,
                                                    **kwargs).items() if k != "image_grid_thw"}
                for kwargs in ({}, more)]

    def run(batch, mesh=None, specs=None, fn=grad_fn):
        if mesh is None:
            return jax.jit(fn)(params, batch), None
        p_shard = sharding.param_shardings(params, mesh, min_sharded_size=0)
        b_shard = (sharding.batch_shardings(batch, mesh) if specs is None
                   else {k: NamedSharding(mesh, specs(k, np.shape(v))) for k, v in batch.items()})
        compiled = jax.jit(traced_under_mesh(fn, mesh), in_shardings=(p_shard, b_shard)).lower(
            params, batch).compile()
        out = compiled(jax.device_put(params, p_shard), jax.device_put(batch, b_shard))
        return out, collectives(compiled.as_text(), mesh.devices.shape)

    diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    def compare(got, want, real):
        (got_loss, got_logits), got_grads = got
        (want_loss, want_logits), want_grads = want
        return {"loss": abs(float(got_loss) - float(want_loss)),
                "logits": diff(np.asarray(got_logits)[real], np.asarray(want_logits)[real]),
                "grads": max(jax.tree.leaves(jax.tree.map(diff, got_grads, want_grads))),
                "max_abs_grad": max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))}

    def vision_collectives(a, b, crossing):
        # collectives whose shapes follow the vision shapes: in one program and not the other
        changed = (a - b) + (b - a)
        return sorted([op, shape] for op, shape, crosses in changed if crosses == crossing)

    # Shard 0: rows of two images of different sizes and of one; shard 1: two text-only rows, no image at all.
    rows = image_rows(config, LAYOUT_B)
    reference, _ = run(batches(rows, 1)[0])  # one shard, one device
    batch, padded = batches(rows, 2)
    result = {}
    meshes = {"fsdp2": sharding.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2]),
              "data2_tensor4": sharding.make_mesh(data=2, fsdp=1, tensor=4)}
    for name, mesh in meshes.items():
        (got, found), (got_padded, found_padded) = run(batch, mesh), run(padded, mesh)
        real = batch["segment_ids"] > 0
        result[name] = {"diffs": compare(got, reference, real), "padded_diffs": compare(got_padded, reference, real),
                        "batch_collectives": sum(n for (_, _, crosses), n in found.items() if crosses),
                        "vision_collectives": vision_collectives(found, found_padded, True),
                        "within_shard_vision_collectives": len(vision_collectives(found, found_padded, False)),
                        "pixel_values_spec": [list(axes) for axes in
                                              sharding.batch_shardings(batch, mesh)["pixel_values"].spec]}
    # Control: one shard holding every image, replicated on the 2-device mesh (the layout before batch shards):
    # the forward's collectives then follow the vision shapes, so the check above can fail.
    mesh = meshes["fsdp2"]
    one, bigger = batches(rows, 1)
    specs = lambda key, shape: (P() if sharding.is_vision_shard_key(key)
                                else sharding.batch_partition_spec(key, shape, 4, 32))
    forward = lambda p, b: models.apply(p, b, config)
    result["control_vision_collectives"] = vision_collectives(run(one, mesh, specs, forward)[1],
                                                              run(bigger, mesh, specs, forward)[1], True)
    try:
        sharding.batch_shardings(one, mesh)
        result["mesh_error"] = None
    except ValueError as error:
        result["mesh_error"] = str(error)
    print(json.dumps(result))
''')


@pytest.fixture(scope="module")
def sharded_result():
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK, REPO], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one CPU subprocess (~1 min) shared by the two tests below
def test_two_shards_on_2_and_8_devices_equal_one_shard_on_one_device(sharded_result):
    """Loss, logits and every gradient of S = 2 shards (rows with 0-2 images of different sizes, text-only rows, a
    shard without any image padded to the other's patches; also both padded to more patches and slots) on 2
    devices (fsdp) and on 8 (data 2 x tensor 4) equal S = 1 on one device."""
    for name in ("fsdp2", "data2_tensor4"):
        r = sharded_result[name]
        assert r["pixel_values_spec"] == [["data", "fsdp"]], r  # the shard axis splits with the rows
        for diffs in (r["diffs"], r["padded_diffs"]):
            assert diffs["max_abs_grad"] > 1e-2, (name, diffs)  # non-trivial gradients
            assert max(diffs["loss"], diffs["logits"], diffs["grads"]) <= TOLERANCE, (name, diffs)


@pytest.mark.slow
def test_no_collective_moves_pixels_or_image_embeddings(sharded_result):
    """Any collective carrying pixels, slot activations or image embeddings has a shape that follows the vision
    shapes (P_s, slots). Two sharded programs that differ only in those shapes have the same collectives across
    batch shards (devices of different data/fsdp coordinates: FSDP's parameter gathers and gradient reductions,
    the loss's sums), so none of those moves vision data; only the tensor axis, within a shard, may (Megatron's
    reductions). The one-shard, replicated layout on the same mesh fails this check: every device sums up every
    image's embeddings (an all-reduce of [P//4, D])."""
    for name in ("fsdp2", "data2_tensor4"):
        r = sharded_result[name]
        assert r["batch_collectives"] > 0 and r["vision_collectives"] == [], (name, r)
    assert sharded_result["control_vision_collectives"], sharded_result
    assert "num_shards=2" in sharded_result["mesh_error"], sharded_result
