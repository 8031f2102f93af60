"""Orbax checkpoints of the TrainState plus the data iterator's position, for exact resume.

Layout: RUN_DIR/checkpoints/<step>/{state, data}. Orbax writes each checkpoint into a temporary
folder and renames it when complete, so a process killed mid-write leaves the previous checkpoint
as the latest one (the half-written temporary folder is ignored and cleaned up). Saves are async
by default: the device->host copy happens in `save`, the disk write overlaps the next steps.
Paths may be local or `gs://...` (Orbax handles both).
"""
from __future__ import annotations

import base64
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

_BYTES_TAG = "__bytes_b64__"


def _to_json(data_state: Any) -> Any:
    """Iterator states may be bytes (grain DataLoader) or dicts (grain datasets): make JSON-able."""
    if isinstance(data_state, bytes):
        return {_BYTES_TAG: base64.b64encode(data_state).decode()}
    return data_state


def _from_json(stored: Any) -> Any:
    if isinstance(stored, dict) and set(stored) == {_BYTES_TAG}:
        return base64.b64decode(stored[_BYTES_TAG])
    return stored


class CheckpointStore:
    """save every `every_steps`, keep the newest `keep`, restore the latest or any step."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        if every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps={every_steps} must be > 0")
        if keep <= 0:
            raise ValueError(f"checkpoint.keep={keep} must be > 0")
        # orbax logs every save at INFO; keep the progress bar readable
        logging.getLogger("absl").setLevel(logging.WARNING)
        self.directory = directory
        self.every_steps = every_steps
        # the interval is decided here (step % every_steps), not by orbax's save-decision policy,
        # so which steps get a checkpoint never depends on timing (e.g. a save still in flight)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(directory, options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: Any = None, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or force). Returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        if self.latest_step() is not None and self.latest_step() >= step:
            return False  # already saved (e.g. the final step of a resumed, finished run)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave({"iterator": _to_json(data_state)}))
        return self._manager.save(int(step), args=args, force=True)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any, int]:
        """-> (state, data_state, step) of `step` (default the latest).

        abstract_state: a pytree like the state (arrays or jax.ShapeDtypeStruct with shardings);
        restored arrays take its shapes, dtypes and shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored.state, _from_json(restored.data["iterator"]), step

    def wait(self) -> None:
        """Block until any async save has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
