"""Checkpoint storage under one root folder, addressed by tinker:// paths.

  tinker://{model_id}/weights/{name}          -> {root}/{model_id}/weights/{name}/state.msgpack
                                                  (LoRA tree, optimizer state, step, LoRA config)
  tinker://{model_id}/sampler_weights/{name}  -> {root}/{model_id}/sampler_weights/{name}/{version}/
                                                  (a PEFT adapter; LATEST names the newest version)
Every save of a sampler checkpoint writes a NEW version folder: vLLM keeps a stale prefix cache when
an adapter is reloaded from the same path (../shared/notes/vllm.md).

Training state is flax msgpack (arrays as raw bytes + dtype + shape) holding the array trees' state
dicts and a JSON string of the scalars: loading it never runs code (pickle would), and the caller
rebuilds typed trees (optax NamedTuples) with `flax.serialization.from_state_dict` against a template.

Paths are validated: exactly three segments, a known kind, and names that resolve inside the root
(no "..", no absolute parts, no path separators) - a client cannot read or write outside the root.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import uuid

from jaxrl_vl.tinker.protocol import NotFoundError, UserError

KINDS = {"weights": "training", "sampler_weights": "sampler"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,200}$")
STATE_FILE = "state.msgpack"
LEGACY_PICKLE_FILE = "state.pkl"  # written by earlier versions; refused (unpickling can run code)
META_FILE = "meta.json"
LATEST_FILE = "LATEST"


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
    model_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"


def _check_segment(value: str, field: str) -> str:
    if not _SAFE_NAME.match(value or "") or value in (".", ".."):
        raise UserError(f"{field} {value!r} is not a valid checkpoint name: use 1-200 characters of "
                        "letters, digits and _ . : @ + = - (no slashes, no '..')")
    return value


def parse_tinker_path(path: str) -> CheckpointPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserError(f"path {path!r}: expected tinker://MODEL_ID/weights/NAME or "
                        "tinker://MODEL_ID/sampler_weights/NAME")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise UserError(f"path {path!r}: expected exactly tinker://MODEL_ID/(weights|sampler_weights)/NAME")
    return CheckpointPath(_check_segment(parts[0], "model id"), parts[1], _check_segment(parts[2], "name"))


class CheckpointStore:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)

    def folder(self, cp: CheckpointPath) -> str:
        folder = os.path.realpath(os.path.join(self.root, cp.model_id, cp.kind, cp.name))
        if os.path.commonpath([folder, self.root]) != self.root:
            raise UserError(f"{cp.tinker_path} resolves outside the storage root")
        return folder

    def _write_meta(self, folder: str, cp: CheckpointPath, user_metadata: dict | None,
                    ttl_seconds: int | None) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = {"checkpoint_id": f"{cp.kind}/{cp.name}", "checkpoint_type": KINDS[cp.kind],
                "time": now.isoformat(), "tinker_path": cp.tinker_path, "user_metadata": user_metadata,
                "expires_at": (now + datetime.timedelta(seconds=ttl_seconds)).isoformat() if ttl_seconds else None}
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f)

    def save_state(self, cp: CheckpointPath, trees: dict, info: dict, *, user_metadata=None,
                   ttl_seconds=None) -> str:
        """trees: {name: pytree of host arrays} (NamedTuples become dicts: restore them with
        `flax.serialization.from_state_dict`); info: JSON-serializable scalars (step, config, ...)."""
        from flax import serialization

        payload = serialization.msgpack_serialize({
            "trees": {name: serialization.to_state_dict(tree) for name, tree in trees.items()},
            "info_json": json.dumps(info)})
        folder = self.folder(cp)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{STATE_FILE}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, os.path.join(folder, STATE_FILE))
        self._write_meta(folder, cp, user_metadata, ttl_seconds)
        return cp.tinker_path

    def load_state(self, cp: CheckpointPath) -> tuple[dict, dict]:
        """-> (trees as nested dicts of numpy arrays, info). Raises UserError for a file that is not
        this format (never executes its contents)."""
        from flax import serialization

        if cp.kind != "weights":
            raise UserError(f"{cp.tinker_path}: load_weights needs a training checkpoint "
                            "(tinker://MODEL_ID/weights/NAME from save_state), not sampler weights")
        folder = self.folder(cp)
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(folder, LEGACY_PICKLE_FILE)):
                raise UserError(f"checkpoint {cp.tinker_path} is in the old pickle format, which this server "
                                "no longer loads (unpickling can run code); save it again with this version")
            raise NotFoundError(f"checkpoint {cp.tinker_path} does not exist on this server")
        with open(path, "rb") as f:
            data = f.read()
        try:
            payload = serialization.msgpack_restore(data)
            trees, info = payload["trees"], json.loads(payload["info_json"])
            if not isinstance(trees, dict) or not isinstance(info, dict):
                raise TypeError("trees/info are not mappings")
        except Exception as error:  # noqa: BLE001 - any decoding failure means "not our format"
            raise UserError(f"checkpoint {cp.tinker_path}: {STATE_FILE} is corrupt or not a saved training "
                            f"state ({type(error).__name__}: {error}); save it again") from error
        return trees, info

    def new_sampler_version(self, cp: CheckpointPath) -> str:
        """A fresh folder for the next version of a sampler checkpoint (caller writes the adapter)."""
        folder = self.folder(cp)
        version = f"v{datetime.datetime.now().strftime('%Y%m%d%H%M%S%f')}-{uuid.uuid4().hex[:6]}"
        path = os.path.join(folder, version)
        os.makedirs(path)
        return path

    def commit_sampler_version(self, cp: CheckpointPath, version_dir: str, *, user_metadata=None,
                               ttl_seconds=None) -> str:
        folder = self.folder(cp)
        with open(os.path.join(folder, LATEST_FILE), "w") as f:
            f.write(os.path.basename(version_dir))
        self._write_meta(folder, cp, user_metadata, ttl_seconds)
        return cp.tinker_path

    def sampler_dir(self, cp: CheckpointPath) -> str:
        if cp.kind != "sampler_weights":
            raise UserError(f"{cp.tinker_path}: sampling needs sampler weights "
                            "(tinker://MODEL_ID/sampler_weights/NAME from save_weights_for_sampler)")
        folder = self.folder(cp)
        latest = os.path.join(folder, LATEST_FILE)
        if not os.path.isfile(latest):
            raise NotFoundError(f"sampler checkpoint {cp.tinker_path} does not exist on this server")
        with open(latest) as f:
            return os.path.join(folder, f.read().strip())

    def delete(self, cp: CheckpointPath) -> None:
        folder = self.folder(cp)
        if not os.path.isdir(folder):
            raise NotFoundError(f"checkpoint {cp.tinker_path} does not exist on this server")
        shutil.rmtree(folder)

    def list(self, model_id: str) -> list[dict]:
        """Metadata of the model's checkpoints, oldest first."""
        out = []
        for kind in KINDS:
            base = os.path.join(self.root, _check_segment(model_id, "model id"), kind)
            if not os.path.isdir(base):
                continue
            for name in os.listdir(base):
                meta = os.path.join(base, name, META_FILE)
                if os.path.isfile(meta):
                    with open(meta) as f:
                        out.append(json.load(f))
        return sorted(out, key=lambda m: m["time"])
