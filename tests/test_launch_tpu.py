"""launch.tpu: exact gcloud command lines (v5e-8, v5p-16, multi-slice), cleanup on Ctrl-C / SIGTERM /
failure, and the code bundle."""
import io
import os
import signal
import tarfile
import tempfile

import pytest

from launch.tpu import __main__ as cli
from launch.tpu import commands, lifecycle
from launch.tpu.accelerators import parse_tpu
from launch.tpu.bundle import make_bundle


def dry_run(argv):
    out = io.StringIO()
    runner = lifecycle.DryRunRunner(out=out)
    assert cli.main(argv, runner=runner) == 0
    return out.getvalue().splitlines()


INSTALL = ("set -euo pipefail; mkdir -p ~/jaxrl_vl && tar -xzf ~/jaxrl_vl_code.tar.gz -C ~/jaxrl_vl && cd ~/jaxrl_vl; "
           "PY=$(command -v python3.12 || command -v python3.11 || true); if [ -z \"$PY\" ]; then curl -LsSf "
           "https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv python install 3.11 && PY=$(~/.local/bin/uv python "
           "find 3.11); fi; test -x .venv/bin/python || \"$PY\" -m venv .venv; .venv/bin/pip install --quiet --upgrade "
           "pip && .venv/bin/pip install --quiet -e . 'jax[tpu]'")


def test_v5e_8_single_host_up_dry_run():
    lines = dry_run(["up", "demo", "--tpu=v5e-8", "--zone=us-west4-a", "--project=proj", "--spot",
                     "--config=configs/sft_digits.py", "--bundle-path=/tmp/code.tgz", "--dry-run",
                     "--", "--config.train.num_steps=10"])
    loc = "--zone=us-west4-a --project=proj"
    assert lines == [
        f"gcloud compute tpus queued-resources create demo --node-id=demo --accelerator-type=v5litepod-8 "
        f"--runtime-version=v2-alpha-tpuv5-lite {loc} --spot",
        f"gcloud compute tpus queued-resources describe demo {loc} '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm scp /tmp/code.tgz demo:jaxrl_vl_code.tar.gz --worker=all {loc}",
        commands.format_command(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "demo", "--worker=all",
                                 "--zone=us-west4-a", "--project=proj", "--command=" + INSTALL]),
        # one host: no --config.distributed=on
        f"gcloud compute tpus tpu-vm ssh demo --worker=all {loc} '--command=set -o pipefail; cd ~/jaxrl_vl && "
        f".venv/bin/python launch/train.py --config configs/sft_digits.py --config.train.num_steps=10 2>&1 | "
        f"tee ~/jaxrl_vl_train.log'",
        f"gcloud compute tpus queued-resources delete demo {loc} --force --quiet",
    ]


def test_v5p_16_two_hosts_run_on_all_workers():
    tpu = parse_tpu("v5p-16")
    assert (tpu.accelerator_type, tpu.runtime_version, tpu.num_chips, tpu.num_hosts) == ("v5p-16", "v2-alpha-tpuv5", 8, 2)
    lines = dry_run(["create", "big", "--tpu=v5p-16", "--zone=us-east5-a", "--project=proj", "--reserved", "--dry-run"])
    assert lines == ["gcloud compute tpus queued-resources create big --node-id=big --accelerator-type=v5p-16 "
                     "--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a --project=proj --reserved"]
    lines = dry_run(["run", "big", "--tpu=v5p-16", "--zone=us-east5-a", "--project=proj", "--config=configs/rl_maze.py",
                     "--code=git:https://github.com/org/jaxrl_vl.git#v1", "--env=WANDB_MODE=offline", "--dry-run"])
    assert len(lines) == 3  # no code scp when cloning; the env file goes by scp, not on the command line
    assert lines[0].startswith("gcloud compute tpus tpu-vm scp /") and lines[0].endswith(
        "/jaxrl_vl_env_big big:jaxrl_vl_train.env --worker=all --zone=us-east5-a --project=proj")
    assert lines[1].startswith("gcloud compute tpus tpu-vm ssh big --worker=all --zone=us-east5-a --project=proj '--command=")
    assert "git clone https://github.com/org/jaxrl_vl.git ~/jaxrl_vl" in lines[1]
    assert "checkout --quiet v1" in lines[1]
    assert lines[2] == ("gcloud compute tpus tpu-vm ssh big --worker=all --zone=us-east5-a --project=proj "
                        "'--command=set -o pipefail; cd ~/jaxrl_vl && chmod 600 ~/jaxrl_vl_train.env && set -a && "
                        ". ~/jaxrl_vl_train.env && set +a && .venv/bin/python launch/train.py --config configs/rl_maze.py "
                        "--config.distributed=on 2>&1 | tee ~/jaxrl_vl_train.log'")
    assert "offline" not in " ".join(lines)


def test_env_values_travel_in_a_private_file_not_argv(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRL_VL_SERVER_TOKEN", "s3cret-" * 6)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    copied = {}

    class Recorder(FakeRunner):
        def run(self, argv, *, capture=False, detach=False):
            if "scp" in argv and argv[-4].endswith("jaxrl_vl_train.env"):
                path = argv[-5]
                copied["text"], copied["mode"] = open(path).read(), os.stat(path).st_mode & 0o777
            return super().run(argv, capture=capture, detach=detach)

    runner = Recorder()
    assert cli.main(["run", "t", "--tpu=v5e-8", "--zone=z", "--project=p", "--config=c.py", "--skip-install",
                     "--code=git:https://example.invalid/r.git", "--env=JAXRL_VL_SERVER_TOKEN", "--env=A=b c"],
                    runner=runner) == 0
    assert copied == {"text": "A='b c'\nJAXRL_VL_SERVER_TOKEN=" + "s3cret-" * 6 + "\n", "mode": 0o600}
    assert list(tmp_path.iterdir()) == []  # the local copy is removed after the run
    assert cli.main(["run", "t", "--tpu=v5e-8", "--zone=z", "--project=p", "--config=c.py",
                     "--env=NOT_SET_ANYWHERE_123", "--dry-run"], runner=FakeRunner()) == 1


def test_git_code_source_with_an_ssh_url_and_a_ref():
    script = commands.install_script(code_source="git:git@github.com:org/jaxrl_vl.git#feature/x")
    assert "git clone git@github.com:org/jaxrl_vl.git ~/jaxrl_vl" in script
    assert "checkout --quiet feature/x" in script
    assert "checkout" not in commands.install_script(code_source="git:git@github.com:org/jaxrl_vl.git")
    with pytest.raises(ValueError, match="--code='svn:x'"):
        commands.install_script(code_source="svn:x")


def test_multislice_node_count_2():
    lines = dry_run(["up", "ms", "--tpu=v5e-16", "--node-count=2", "--zone=z1", "--project=p", "--best-effort",
                     "--config=configs/sft_digits.py", "--bundle-path=/tmp/c.tgz", "--skip-install", "--dry-run"])
    assert lines[0] == ("gcloud alpha compute tpus queued-resources create ms --node-count=2 --node-prefix=ms "
                        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --zone=z1 --project=p "
                        "--best-effort")
    assert lines[2] == ("gcloud compute tpus queued-resources scp /tmp/c.tgz ms:jaxrl_vl_code.tar.gz --node=all "
                        "--worker=all --zone=z1 --project=p")
    assert lines[3] == ("gcloud compute tpus queued-resources ssh ms --node=all --worker=all --zone=z1 --project=p "
                        "'--command=set -o pipefail; cd ~/jaxrl_vl && .venv/bin/python launch/train.py --config "
                        "configs/sft_digits.py --config.distributed=on 2>&1 | tee ~/jaxrl_vl_train.log'")
    assert lines[4] == "gcloud compute tpus queued-resources delete ms --zone=z1 --project=p --force --quiet"
    assert len(lines) == 5
    logs = dry_run(["logs", "ms", "--zone=z1", "--project=p", "--node-count=2", "--dry-run"])
    assert logs == ["gcloud compute tpus queued-resources ssh ms --node=0 --worker=0 --zone=z1 --project=p "
                    "'--command=tail -n 100 -F ~/jaxrl_vl_train.log'"]


class FakeRunner:
    """Records commands; the describe answers come from `states`; `on_train` runs when the training
    ssh starts (raise, or signal this process)."""

    def __init__(self, states=("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"), on_train=None):
        self.states, self.on_train, self.calls = list(states), on_train, []

    def run(self, argv, *, capture=False, detach=False):
        kind = argv[argv.index("tpus") + 2] if "tpus" in argv else argv[0]
        if kind == "ssh" and "launch/train.py" in argv[-1]:
            kind = "train"
        elif kind == "ssh":
            kind = "install"
        self.calls.append((kind, detach))
        if kind == "describe":
            return self.states.pop(0) + "\n"
        if kind == "train" and self.on_train:
            self.on_train()
        return ""


def _up_argv():
    return ["up", "t", "--tpu=v5e-8", "--zone=z", "--project=p", "--config=configs/sft_digits.py",
            "--bundle-path=/tmp/x.tgz", "--code=git:https://example.invalid/r.git", "--poll-seconds=0"]


def test_ctrl_c_during_training_deletes_after_everything_else():
    def interrupt():
        raise KeyboardInterrupt
    runner = FakeRunner(on_train=interrupt)
    assert cli.main(_up_argv(), runner=runner) == 130
    assert [kind for kind, _ in runner.calls] == ["create", "describe", "describe", "describe", "install", "train", "delete"]
    assert runner.calls[-1] == ("delete", True)  # detached: a second Ctrl-C cannot kill the delete
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_during_training_deletes():
    previous = signal.getsignal(signal.SIGTERM)
    runner = FakeRunner(states=("ACTIVE",), on_train=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert cli.main(_up_argv(), runner=runner) == 130
    assert [kind for kind, _ in runner.calls] == ["create", "describe", "install", "train", "delete"]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_failed_queued_resource_is_deleted_and_reported(capsys):
    runner = FakeRunner(states=("WAITING_FOR_RESOURCES", "FAILED"))
    assert cli.main(_up_argv(), runner=runner) == 1
    assert [kind for kind, _ in runner.calls] == ["create", "describe", "describe", "delete"]
    assert "is FAILED" in capsys.readouterr().err


def test_a_rejected_create_deletes_nothing():
    """gcloud refusing the create (e.g. the name is taken) must not delete the existing resource."""
    class Rejecting(FakeRunner):
        def run(self, argv, *, capture=False, detach=False):
            super().run(argv, capture=capture, detach=detach)
            if "create" in argv:
                raise lifecycle.GcloudError("exit 1: ALREADY_EXISTS")
            return ""

    runner = Rejecting()
    assert cli.main(_up_argv(), runner=runner) == 1
    assert [kind for kind, _ in runner.calls] == ["create"]


def test_ctrl_c_during_create_still_deletes():
    class InterruptedCreate(FakeRunner):
        def run(self, argv, *, capture=False, detach=False):
            super().run(argv, capture=capture, detach=detach)
            if "create" in argv:
                raise KeyboardInterrupt
            return ""

    runner = InterruptedCreate()
    assert cli.main(_up_argv(), runner=runner) == 130
    assert [kind for kind, _ in runner.calls] == ["create", "delete"]


def test_keep_skips_delete():
    runner = FakeRunner(states=("ACTIVE",))
    assert cli.main(_up_argv() + ["--keep"], runner=runner) == 0
    assert [kind for kind, _ in runner.calls] == ["create", "describe", "install", "train"]


def test_wait_until_active_times_out():
    clock = iter(range(0, 1000, 10))
    runner = FakeRunner(states=["WAITING_FOR_RESOURCES"] * 50)
    with pytest.raises(TimeoutError, match="not ACTIVE after 30 s"):
        lifecycle.wait_until_active(runner, commands.Target("t", "z", "p"), poll_seconds=0, timeout_seconds=30,
                                    sleep=lambda s: None, clock=lambda: next(clock), log=lambda line: None)


@pytest.mark.parametrize("name,accelerator,hosts", [("v5litepod-4", "v5litepod-4", 1), ("v5e-16", "v5litepod-16", 4),
                                                    ("v6e-8", "v6e-8", 1), ("v4-32", "v4-32", 4), ("v5p-8", "v5p-8", 1)])
def test_parse_tpu_sizes(name, accelerator, hosts):
    tpu = parse_tpu(name)
    assert (tpu.accelerator_type, tpu.num_hosts) == (accelerator, hosts)


@pytest.mark.parametrize("name", ["v5e", "tpu-8", "v3-8", "v5p-7"])
def test_parse_tpu_rejects_bad_names(name):
    with pytest.raises(ValueError, match="--tpu="):
        parse_tpu(name)


def test_bad_inputs_are_clear_errors(capsys):
    assert cli.main(["create", "Bad_Name", "--tpu=v5e-8", "--zone=z", "--project=p", "--dry-run"]) == 1
    assert "NAME='Bad_Name'" in capsys.readouterr().err
    assert cli.main(["run", "ok", "--tpu=v5e-8", "--zone=z", "--project=p", "--config=c.py", "--env=NOVALUE",
                     "--dry-run"]) == 1
    assert "--env='NOVALUE'" in capsys.readouterr().err  # not set locally either
    assert cli.main(["delete", "ok", "--zone=z", "--project=p", "--dry-run", "--", "--config.x=1"]) == 2


def test_bundle_holds_the_code_and_not_the_venv(tmp_path):
    path, num_files = make_bundle(tmp_path / "code.tar.gz")
    names = set(tarfile.open(path).getnames())
    assert len(names) == num_files
    assert {"launch/tpu/commands.py", "launch/train.py", "pyproject.toml"} <= names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n for n in names)
