"""Client sessions and sampling sessions (ids and what each sampling session samples from).

Ids follow the SDK's expectations: sessions `sess-<hex>`, training models `{session_id}:train:{n}` (the
SDK computes this id itself when it creates a model by loading a checkpoint), sampling sessions
`{session_id}:sample:{n}`.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from jaxrl_vl.tinker.protocol import NotFoundError, UserError


@dataclasses.dataclass
class Session:
    session_id: str
    tags: list
    user_metadata: dict | None
    created: float = dataclasses.field(default_factory=time.time)
    last_heartbeat: float = dataclasses.field(default_factory=time.time)
    finished: str | None = None  # the finish reason, once finished


@dataclasses.dataclass(frozen=True)
class SamplingSession:
    sampling_session_id: str
    base_model: str
    model_path: str | None  # tinker:// sampler path, None = the base model
    adapter_folder: str | None  # the PEFT folder version this session samples from


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{int(model_seq_id)}"


def sampling_session_id_for(session_id: str, seq_id: int) -> str:
    return f"{session_id}:sample:{int(seq_id)}"


class Sessions:
    def __init__(self):
        self.sessions: dict[str, Session] = {}
        self.sampling: dict[str, SamplingSession] = {}

    def create(self, tags=None, user_metadata=None) -> Session:
        session = Session(f"sess-{uuid.uuid4().hex[:12]}", list(tags or []), user_metadata)
        self.sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UserError(f"unknown session_id {session_id!r}; call create_session first")
        return session

    def heartbeat(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.last_heartbeat = time.time()

    def finish(self, session_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.finished = reason

    def add_sampling(self, sampling: SamplingSession) -> SamplingSession:
        self.sampling[sampling.sampling_session_id] = sampling
        return sampling

    def get_sampling(self, sampling_session_id: str) -> SamplingSession:
        sampling = self.sampling.get(sampling_session_id)
        if sampling is None:
            raise NotFoundError(f"unknown sampling_session_id {sampling_session_id!r}; create it with "
                            "create_sampling_session or save_weights_for_sampler")
        return sampling
