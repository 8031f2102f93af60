"""Experiment configs: load `configs/<x>.py:get_config()` and apply `--config.a.b=v` overrides.

The command line is ml-collections `config_flags` style without absl's global flag state, so the
same parser is callable from tests and notebooks:

    python launch/train.py --config configs/sft_digits.py --config.optim.learning_rate=3e-4

An override's value is parsed by the type of the default it replaces (int, float, bool, str,
tuple/list via Python literal syntax); a key that is not in the config fails with the list of
valid keys, so a typo can never silently train with the default.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A config file or override the user must fix; the message says how."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import a python file defining `get_config()` and return its ConfigDict.

    `path` may carry an argument after a colon (`configs/x.py:small`), passed to get_config.
    """
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist (expected e.g. configs/sft_digits.py)")
    name = "_jaxrl_vl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # configs import their siblings (`import base`), so their folder goes on the path while loading
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} must define get_config() -> ml_collections.ConfigDict")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ConfigDict")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys as dotted paths, sorted ("optim.learning_rate", ...)."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return sorted(keys)


def _parse_value(key: str, text: str, default: Any) -> Any:
    """Parse `text` to the type of `default` (the value being overridden)."""
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"not a boolean (use true/false)")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, (tuple, list)):
            value = ast.literal_eval(text) if text.strip() else ()
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(default)(value)
        # None (or any other type) default: Python literal if it parses, else the raw string.
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    except (ValueError, SyntaxError) as err:
        raise ConfigError(
            f"--config.{key}={text!r}: cannot parse as {type(default).__name__} ({err})") from None


def set_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set dotted `key` from the string `text`; unknown keys raise ConfigError listing valid ones."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        is_leaf = i == len(parts) - 1
        if part not in node or (not is_leaf and not isinstance(node[part], ml_collections.ConfigDict)):
            valid = "\n  ".join(flat_keys(config))
            raise ConfigError(f"unknown config key {key!r}. Valid keys:\n  {valid}")
        if is_leaf:
            if isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key} is a group; set one of its fields, e.g. "
                                  f"--config.{key}.{next(iter(node[part].keys()), '...')}=...")
            with node.unlocked():
                node[part] = _parse_value(key, text, node[part])
        else:
            node = node[part]


def parse_command_line(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """argv (without the program name) -> (config with overrides applied, override strings).

    Accepted forms: `--config PATH`, `--config=PATH`, `--config.a.b=v`, `--config.a.b v`.
    """
    config_path = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise ConfigError("usage: train.py --config configs/<x>.py [--config.key=value ...]")
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a path, e.g. --config configs/sft_digits.py")
                i += 1
                config_path = argv[i]
        elif arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value ({arg}=VALUE)")
                i += 1
                key, value = body, argv[i]
            overrides.append((key, value))
        else:
            raise ConfigError(f"unrecognised argument {arg!r}; expected --config PATH or --config.key=value")
        i += 1
    if config_path is None:
        raise ConfigError("missing --config PATH (e.g. --config configs/sft_digits.py)")
    config = load_config_file(config_path)
    for key, value in overrides:
        set_override(config, key, value)
    return config, [f"--config.{k}={v}" for k, v in overrides]
