"""The shared training core: the RL step sharded over (data, fsdp, tensor) equals one device, `mesh.*` decides
where the RL state lives, stored dtypes follow the config, and the core stays readable (function sizes)."""
import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RL_SHARDED_CHECK = textwrap.dedent(r'''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxrl_vl import models, sharding
    from jaxrl_vl.data.collate import rl_micro_batches, split_host_stats
    from jaxrl_vl.losses.policy import PolicyLossConfig
    from jaxrl_vl.train.rl_step import rl_loss
    from jaxrl_vl.train.state import create_train_state, state_shardings
    from jaxrl_vl.train.step import Forward, ParamsView, make_grad_step, make_update_step
    from jaxrl_vl.activation_sharding import traced_under_mesh
    from jax.sharding import NamedSharding, PartitionSpec as P

    config, params = models.load(sys.argv[1])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        ids = rng.integers(0, 800, size=30 + 5 * i).astype(np.int32)
        row = {"input_ids": ids}
        if i % 3 == 0:
            ids[2:6] = config.image_token_id
            row["pixel_values"] = rng.uniform(-1, 1, (16, config.vision.patch_dim)).astype(np.float32)
            row["image_grid_thw"] = np.array([[1, 4, 4]], np.int32)
        mask = np.zeros(len(ids), np.float32); mask[12:20] = 1.0; mask[24:28] = 1.0
        row.update(loss_mask=mask, advantages=mask * (1.0 if i % 2 else -0.5),
                   turn_ids=(np.where(np.arange(len(ids)) < 22, 0, 1) * (mask > 0) - (mask == 0)).astype(np.int32),
                   rollout_logprobs=mask * -2.0)
        rows.append(row)
    batch = split_host_stats(rl_micro_batches(rows, config, num_micro_batches=2, rows_multiple=4, num_shards=4))[0]
    loss = rl_loss(Forward(config, loss_chunk_size=16), PolicyLossConfig(name="ppo", clip_eps_high=0.28))
    # SGD: the update is the gradient itself (Adam's first step, ~lr * sign(g), turns float-order noise on
    # near-zero gradients into lr-sized differences; the gradients themselves are compared directly too)
    optimizer, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)

    def run(mesh):
        p = sharding.shard_params(params, mesh) if mesh is not None else jax.tree.map(jnp.asarray, params)
        state = create_train_state(p, optimizer, jax.random.PRNGKey(0), mesh=mesh)
        b = batch
        if mesh is not None:
            inner = sharding.batch_shardings({k: v[0] for k, v in batch.items()}, mesh)
            b = jax.device_put(batch, {k: NamedSharding(mesh, P(None, *inner[k].spec)) for k in batch})
        grads, _ = make_grad_step(loss, ParamsView(), mesh=mesh)(state.params, None, b)
        kwargs = {} if mesh is None else dict(state_shardings=state_shardings(state),
                                              metrics_sharding=sharding.replicated(mesh))
        new, metrics = make_update_step(loss, optimizer, schedule, ParamsView(), mesh=mesh, donate=False,
                                        **kwargs)(state, b)
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(new.params)}) if mesh is not None else []
        return jax.device_get(grads), jax.device_get(new.params), {k: float(v) for k, v in metrics.items()}, specs

    g1, p1, m1, _ = run(None)
    g8, p8, m8, specs = run(sharding.make_mesh(data=2, fsdp=2, tensor=2))
    diff = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(json.dumps({"grad_diff": diff(g1, g8), "param_diff": diff(p1, p8),
                      "metrics": {k: [m1[k], m8[k]] for k in ("loss", "grad_norm", "drift_mean", "clip_fraction")},
                      "specs": specs}))
''')


@pytest.mark.slow
def test_rl_step_sharded_over_data_fsdp_tensor_equals_one_device(tiny_model_dir):
    out = subprocess.run([sys.executable, "-c", RL_SHARDED_CHECK, str(tiny_model_dir)], capture_output=True,
                         text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grad_diff"] < 1e-5 and result["param_diff"] < 1e-5, result
    for key, (one, eight) in result["metrics"].items():
        assert abs(one - eight) <= 1e-5 * max(1.0, abs(one)), (key, one, eight)
    assert any("fsdp" in s for s in result["specs"]) and any("tensor" in s for s in result["specs"]), result


TRAINER_PLACEMENT_CHECK = textwrap.dedent(r'''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, optax
    from jaxrl_vl.train.config_overrides import load_config_file
    from jaxrl_vl.train.trainer import Trainer

    out = {}
    for data, fsdp, tensor, dtype in ((1, 4, 1, "float32"), (2, 1, 2, "bfloat16")):
        config = load_config_file("configs/rl_maze.py")
        config.model.path, config.model.build_size = sys.argv[1], ""
        config.run_dir = os.path.join(sys.argv[2], f"{data}{fsdp}{tensor}")
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
        config.model.param_dtype = config.optim.moment_dtype = dtype
        config.metrics.use_wandb = config.metrics.progress_bar = False
        trainer = Trainer(config, total_steps=2, desc="rl")
        leaves = jax.tree.leaves(trainer.state.params)
        adam = [s for s in jax.tree.leaves(trainer.state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)][0]
        mu = jax.tree.leaves(adam.mu)
        out[f"{data}x{fsdp}x{tensor}"] = {
            "specs": sorted({str(x.sharding.spec) for x in leaves}), "devices": len(leaves[0].sharding.device_set),
            "param_dtypes": sorted({str(x.dtype) for x in leaves}), "mu_dtypes": sorted({str(x.dtype) for x in mu})}
        trainer.close()
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_mesh_config_decides_where_rl_state_lives_and_dtypes_follow_the_config(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-c", TRAINER_PLACEMENT_CHECK, str(tiny_model_dir), str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    fsdp, data_tensor = result["1x4x1"], result["2x1x2"]
    assert any("fsdp" in s for s in fsdp["specs"]) and not any("tensor" in s for s in fsdp["specs"]), fsdp
    assert any("tensor" in s for s in data_tensor["specs"]) and not any("fsdp" in s for s in data_tensor["specs"])
    assert fsdp["devices"] == data_tensor["devices"] == 4
    assert fsdp["param_dtypes"] == ["float32"] and data_tensor["param_dtypes"] == ["bfloat16"], result
    assert fsdp["mu_dtypes"] == ["float32"] and data_tensor["mu_dtypes"] == ["bfloat16"], result


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_the_training_core_is_over_80_lines():
    long = [f"{path.name}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path in sorted((REPO / "jaxrl_vl" / "train").glob("*.py")) for fn in _functions(path)
            if fn.end_lineno - fn.lineno + 1 > 80]
    assert not long, long


def test_one_dtype_table_and_one_setup_for_sft_and_rl():
    """The SFT and RL loops build everything through the Trainer: no dtype table, writer or bar of their own."""
    train = REPO / "jaxrl_vl" / "train"
    tables = [p.name for p in train.glob("*.py") if '"bfloat16": jnp.bfloat16' in p.read_text()]
    assert tables == ["precision.py"], tables
    for loop in ("sft_loop.py", "rl_loop.py"):
        text = (train / loop).read_text()
        assert "Trainer(" in text, loop
        for private in ("MetricsWriter(", "tqdm(", "CheckpointStore(", "create_train_state(", "make_optimizer("):
            assert private not in text, (loop, private)
