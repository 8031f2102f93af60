"""metrics.jsonl writer, resume truncation, and tools/plot_metrics.py."""
import json
import os
import subprocess
import sys

from jaxrl_vl.train.metrics import MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(run_dir, steps):
    with MetricsWriter(run_dir, use_wandb=False) as writer:
        for step in steps:
            writer.write(step, {"train/loss": 1.0 / step, "train/lr": 0.1, "eval/acc": float("nan")})


def test_writer_flushes_each_record_and_resume_truncates(tmp_path):
    run_dir = str(tmp_path)
    writer = MetricsWriter(run_dir, use_wandb=False)
    writer.write(1, {"train/loss": 2.5})
    # readable before close: a killed run keeps what it logged
    assert read_metrics(run_dir)[0]["train/loss"] == 2.5
    writer.write(2, {"train/loss": 2.0, "eval/acc": float("nan")})
    writer.write(3, {"train/loss": 1.5})
    writer.close()
    assert read_metrics(run_dir)[1]["eval/acc"] is None  # NaN is not JSON
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "train/lo')  # torn line from a kill
    with MetricsWriter(run_dir, use_wandb=False, resume_from_step=2) as writer:
        writer.write(3, {"train/loss": 1.25})
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["train/loss"] == 1.25


def test_wandb_offline_files_stay_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run_dir = str(tmp_path / "run")
    with MetricsWriter(run_dir, config={"seed": 0}) as writer:
        writer.write(1, {"train/loss": 1.0})
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.path.isdir(os.path.join(run_dir, "wandb"))


def test_plot_tool_writes_pngs(tmp_path):
    run_dir = str(tmp_path)
    _write_run(run_dir, range(1, 11))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), run_dir],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(os.path.basename(p) for p in paths) == ["train.png"]  # eval/acc is all NaN: no panel
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths[0]) > 5000


def test_plot_tool_fails_clearly_without_metrics(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no metrics" in result.stderr


def test_text_curve_lists_train_loss_and_evals(tmp_path):
    from jaxrl_vl.train.plots import text_curve
    run_dir = str(tmp_path)
    with MetricsWriter(run_dir, use_wandb=False) as writer:
        for step in range(1, 31):
            writer.write(step, {"train/loss": 1.0 / step})
        writer.write(30, {"eval/test_accuracy": 0.95, "eval/sample": "text"})
    lines = text_curve(run_dir, max_rows=5).splitlines()
    assert lines[0].startswith("train loss: 1:1.0000") and lines[0].endswith("30:0.0333")
    assert lines[1] == "eval @ step 30: test_accuracy=0.9500"
