"""CPU checks of the training benchmark's pieces (tools/bench_common.py) and of the text decoder's
attention option. No timing assertions: the benchmark itself is a tool, run on a GPU."""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_common  # noqa: E402

from jaxrl_vl.models.config import ModelConfig  # noqa: E402
from jaxrl_vl.models.inputs import make_batch  # noqa: E402
from jaxrl_vl.models.text import attention_implementation  # noqa: E402


def test_rows_have_exact_length_images_and_loss_mask():
    config = ModelConfig.from_hf_dict(bench_common.hf_config_dict("tiny"))
    rows = bench_common.build_rows(config, "tiny", batch_size=2, seq_len=300, images_per_row=3, image_size=64)
    batch = make_batch(rows, config, pad_to_length=300)
    tokens_per_image = (64 // config.vision.patch_size) ** 2 // config.vision.spatial_merge_size ** 2
    assert batch["input_ids"].shape == (2, 300)
    assert (batch["segment_ids"] == 1).all()  # no padding: every token is real
    assert (batch["input_ids"] == config.image_token_id).sum() == 2 * 3 * tokens_per_image
    assert batch["image_grid_thw"].shape == (6, 3)
    # loss only on text: image tokens and the vision start/end markers are excluded
    is_text = ~np.isin(batch["input_ids"], [config.image_token_id, config.vision_start_token_id,
                                            config.vision_end_token_id])
    np.testing.assert_array_equal(batch["loss_mask"], is_text.astype(np.float32))
    # same seed, same rows (the JAX and PyTorch processes rebuild them independently)
    again = bench_common.build_rows(config, "tiny", batch_size=2, seq_len=300, images_per_row=3, image_size=64)
    np.testing.assert_array_equal(rows[1]["pixel_values"], again[1]["pixel_values"])


def test_rows_reject_impossible_geometry():
    config = ModelConfig.from_hf_dict(bench_common.hf_config_dict("tiny"))
    with pytest.raises(ValueError, match="image-size"):
        bench_common.build_rows(config, "tiny", 1, 300, 1, image_size=60)
    with pytest.raises(ValueError, match="seq-len"):
        bench_common.build_rows(config, "tiny", 1, 12, 2, image_size=64)


def test_real_shapes_and_flops_split():
    config = ModelConfig.from_hf_dict(bench_common.hf_config_dict("qwen3_vl_2b"))
    assert (config.text.hidden_size, config.text.num_hidden_layers, config.text.vocab_size) == (2048, 28, 151936)
    full = bench_common.step_flops(config, batch_size=2, seq_len=4096, images_per_row=4, image_size=448, lora=False)
    lora = bench_common.step_flops(config, batch_size=2, seq_len=4096, images_per_row=4, image_size=448, lora=True)
    assert full["total"] == pytest.approx(full["text"] + full["vision"])
    assert lora["total"] == pytest.approx(full["total"] * 2 / 3)
    assert 1.1e14 < full["total"] < 1.3e14  # ~6 * 2.1e9 params * 8192 tokens + attention + lm_head


def test_attention_option_resolution():
    assert attention_implementation("auto", jnp.bfloat16, 128) == "xla"  # CPU backend
    assert attention_implementation("cudnn_causal", jnp.bfloat16, 128) == "cudnn_causal"
    with pytest.raises(ValueError, match="attention="):
        attention_implementation("flash", jnp.bfloat16, 128)


@pytest.mark.slow  # one tiny compile + step on CPU (~15 s)
def test_bench_train_unrolled_runs_on_unstacked_params():
    """The profiled GPU configuration on the tiny model: --layer-loop unrolled stores params unstacked."""
    import bench_train

    summary = bench_train.main(["--like", "tiny", "--seq-len", "256", "--image-size", "64", "--steps", "1",
                                "--skip-torch", "--layer-loop", "unrolled", "--remat", "dots_attn",
                                "--param-dtype", "bfloat16"])
    assert summary["params_layout"] == "unstacked" == summary["jax"]["params_layout"]
    assert all(np.isfinite(summary["jax"]["loss_first_last"]))


def test_kernel_table_joins_the_trace_with_the_optimized_hlo(tmp_path):
    """tools/kernel_table.py on a traced tiny CPU step: fusions get their bytes and the model line they came from."""
    import os
    import subprocess

    import kernel_table

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path / 'hlo'} --xla_dump_hlo_module_re=jit_step "
                                     "--xla_dump_hlo_pass_re=NONE")
    subprocess.run([sys.executable, str(root / "tools" / "bench_train.py"), "--like", "tiny", "--seq-len", "256",
                    "--images-per-row", "1", "--image-size", "64", "--steps", "1", "--skip-torch",
                    "--profile", str(tmp_path / "trace")], env=env, check=True, capture_output=True, cwd=root)
    (hlo,) = (tmp_path / "hlo").glob("*jit_step*after_optimizations.txt")
    rows = kernel_table.kernel_rows(hlo.read_text(), str(tmp_path / "trace"), steps=2)
    joined = [r for r in rows if "mb" in r]
    assert joined and all(r["mb"] >= 0 and r["count"] >= 1 for r in joined)
    assert any("fused_nll.py" in r["source"] for r in joined)  # the chunked loss's kernels, by source line
    assert kernel_table.nbytes("(bf16[2,3]{1,0}, f32[4])") == 2 * 6 + 4 * 4


@pytest.mark.slow
def test_bench_trainer_times_launch_train_and_splits_the_step(tiny_model_dir, tmp_path):
    """tools/bench_trainer.py runs launch/train.py itself and reports the steady-state steps' figures."""
    import json
    import subprocess
    import sys
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_bench_data.py"), "--out", str(data), "--rows", "8",
                    "--images", "2", "--image-size", "64", "--max-length", "192"], check=True, cwd=REPO)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_trainer.py"), "--config",
                          str(REPO / "configs" / "base.py"), "--steps", "4", "--", f"--config.model.path={tiny_model_dir}",
                          "--config.data.source=jsonl", f"--config.data.path={data}", "--config.data.max_length=192",
                          "--config.train.batch_size=2", "--config.train.loss_chunk_size=64",
                          "--config.train.target_positions_multiple=32"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["trainer"] == "sft" and summary["steps_timed"] == 2, summary
    assert summary["tokens_per_second"] > 0 and 0 < summary["mfu"] < 1, summary
    split = summary["split_seconds"]
    assert split["host_data"] >= 0 and split["device_step_and_dispatch"] > 0, summary
    assert summary["recipe"]["dtype"] == "float32" and summary["recipe"]["max_length"] == 192
