"""Config loading and `--config.x=y` overrides (launch/train.py's command line)."""
import os
import subprocess
import sys

import pytest

from jaxrl_vl.train.config_overrides import ConfigError, flat_keys, parse_command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_DIGITS = os.path.join(ROOT, "configs", "sft_digits.py")


def test_overrides_are_parsed_by_the_default_type():
    config, applied = parse_command_line([
        "--config", SFT_DIGITS, "--config.optim.learning_rate=3e-4", "--config.train.num_steps", "7",
        "--config.lora.enabled=true", "--config.lora.targets=('q_proj','v_proj')", "--config.run_dir=/tmp/x"])
    assert config.optim.learning_rate == pytest.approx(3e-4) and isinstance(config.optim.learning_rate, float)
    assert config.train.num_steps == 7 and isinstance(config.train.num_steps, int)
    assert config.lora.enabled is True
    assert tuple(config.lora.targets) == ("q_proj", "v_proj")
    assert config.run_dir == "/tmp/x"
    assert applied[0] == "--config.optim.learning_rate=3e-4"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_command_line([f"--config={SFT_DIGITS}", "--config.optim.learning_rat=1"])
    message = str(err.value)
    assert "optim.learning_rat" in message and "optim.learning_rate" in message and "train.num_steps" in message


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="train.num_steps"):
        parse_command_line(["--config", SFT_DIGITS, "--config.train.num_steps=lots"])
    with pytest.raises(ConfigError, match="lora.enabled"):
        parse_command_line(["--config", SFT_DIGITS, "--config.lora.enabled=maybe"])
    with pytest.raises(ConfigError, match="is a group"):
        parse_command_line(["--config", SFT_DIGITS, "--config.optim=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_command_line(["--config", "configs/nope.py"])
    with pytest.raises(ConfigError, match="missing --config"):
        parse_command_line(["--config.seed=1"])


def test_every_config_file_loads():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            config, _ = parse_command_line(["--config", os.path.join(ROOT, "configs", name)])
            assert "trainer" in flat_keys(config), name


def test_train_py_reports_unknown_key_and_exits_nonzero():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", SFT_DIGITS,
                             "--config.nonsense=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'nonsense'" in result.stderr and "optim.learning_rate" in result.stderr


def test_xla_flag_defaults_keep_what_the_user_set():
    from jaxrl_vl.xla_flags import DEFAULTS, with_defaults

    assert with_defaults("") == " ".join(DEFAULTS)
    assert with_defaults("--xla_dump_to=/tmp/x") == " ".join(("--xla_dump_to=/tmp/x",) + DEFAULTS)
    mine = "--xla_gpu_dot_merger_threshold_mb=32 --xla_gpu_enable_latency_hiding_scheduler=true"
    assert with_defaults(mine) == mine  # an explicit value wins, nothing is duplicated
    assert with_defaults(with_defaults("")) == with_defaults("")
