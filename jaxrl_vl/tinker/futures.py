"""Futures: every submit returns {"request_id": str}; results are fetched with `retrieve_future`.

- Results (JSON dicts or protobuf bytes) and failures are kept after delivery, so retries and late
  polls find them (bounded by `max_kept`, oldest completed first).
- Submits carrying `(key, seq_id)` (a training model id, or a sampling session id) are deduplicated:
  a retry of the same pair gets the first request's id back and runs nothing.
- Training work of one model runs strictly in `seq_id` order (1, 2, 3, ...). A request whose
  predecessor never arrives (the client gave up on it, or it was rejected) waits `gap_seconds`, then
  runs, so one lost request cannot stall a model forever.
- `wait` long-polls: it returns None after `poll_seconds` so the route can answer `try_again` (the SDK
  re-polls immediately; a short poll would spin).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from jaxrl_vl.tinker.protocol import UserError

log = logging.getLogger("jaxrl_vl.tinker")


@dataclasses.dataclass
class Failure:
    message: str
    category: str  # "user" | "server" | "unknown"

    def to_json(self) -> dict:
        return {"error": self.message, "category": self.category}


@dataclasses.dataclass
class FutureRecord:
    request_id: str
    done: asyncio.Event
    result: Any = None  # dict (JSON) | bytes (protobuf) | Failure
    created: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Order:
    """Seq-id ordering state of one training model."""
    last_done: int = 0
    running: bool = False
    pending: dict[int, float] = dataclasses.field(default_factory=dict)  # seq_id -> arrival time
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)


def classify(error: BaseException) -> Failure:
    if isinstance(error, UserError):
        return Failure(str(error), "user")
    return Failure(f"{type(error).__name__}: {error}", "server")


class FutureStore:
    def __init__(self, *, poll_seconds: float = 25.0, gap_seconds: float = 3.0, max_kept: int = 20000):
        self.poll_seconds = poll_seconds
        self.gap_seconds = gap_seconds
        self.max_kept = max_kept
        self._records: OrderedDict[str, FutureRecord] = OrderedDict()
        self._dedup: dict[tuple[str, int], str] = {}
        self._orders: dict[str, _Order] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    def _new_record(self) -> FutureRecord:
        record = FutureRecord(str(next(self._ids)), asyncio.Event())
        self._records[record.request_id] = record
        self._evict()
        return record

    def _evict(self) -> None:
        while len(self._records) > self.max_kept:
            oldest_done = next((rid for rid, r in self._records.items() if r.done.is_set()), None)
            if oldest_done is None:
                return
            del self._records[oldest_done]

    def submit(self, work: Callable[[], Awaitable[Any]], *, key: str | None = None, seq_id: int | None = None,
               ordered: bool = False) -> str:
        """Schedule `work` (an async callable returning the result) and return its request id.

        key/seq_id dedupe retries; ordered=True also runs the work in seq_id order among `key`'s requests."""
        if key is not None and seq_id is not None:
            existing = self._dedup.get((key, seq_id))
            if existing is not None and existing in self._records:
                return existing
        record = self._new_record()
        if key is not None and seq_id is not None:
            self._dedup[(key, seq_id)] = record.request_id
        if ordered and key is not None and seq_id is not None:
            runner = self._run_ordered(record, work, key, seq_id)
        else:
            runner = self._run(record, work)
        task = asyncio.get_running_loop().create_task(runner)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record.request_id

    def fail_now(self, failure: Failure, *, key: str | None = None, seq_id: int | None = None) -> str:
        """A request that failed validation still gets a future (and consumes its seq slot)."""
        async def fail():
            raise UserError(failure.message)
        return self.submit(fail, key=key, seq_id=seq_id, ordered=key is not None and seq_id is not None)

    async def _run(self, record: FutureRecord, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            record.result = await work()
        except Exception as error:  # every failure becomes {error, category}; the server keeps serving
            if not isinstance(error, UserError):
                log.error("request %s failed:\n%s", record.request_id, traceback.format_exc())
            record.result = classify(error)
        finally:
            record.done.set()

    def _ready(self, order: _Order, seq_id: int) -> bool:
        if order.running:
            return False
        if seq_id <= order.last_done + 1:
            return True
        # A gap: run only the lowest waiting seq_id, after it waited gap_seconds.
        lowest = min(order.pending)
        return seq_id == lowest and time.monotonic() - order.pending[seq_id] >= self.gap_seconds

    async def _run_ordered(self, record: FutureRecord, work, key: str, seq_id: int) -> None:
        order = self._orders.setdefault(key, _Order())
        order.pending[seq_id] = time.monotonic()
        async with order.changed:
            while not self._ready(order, seq_id):
                try:
                    await asyncio.wait_for(order.changed.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
            order.running = True
            del order.pending[seq_id]
        try:
            await self._run(record, work)
        finally:
            async with order.changed:
                order.running = False
                order.last_done = max(order.last_done, seq_id)
                order.changed.notify_all()

    def exists(self, request_id: str) -> bool:
        return request_id in self._records

    async def wait(self, request_id: str, timeout_seconds: float | None = None) -> Any:
        """The result (dict | bytes | Failure), or None if still running after the long-poll window.
        Raises KeyError for unknown ids."""
        record = self._records[request_id]
        try:
            await asyncio.wait_for(record.done.wait(), self.poll_seconds if timeout_seconds is None
                                   else timeout_seconds)
        except asyncio.TimeoutError:
            return None
        return record.result
