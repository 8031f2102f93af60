"""Chat records -> a grain pipeline of training batches with a checkpointable iterator.

    examples = render_records(records, renderer, max_length=..., on_bad_record="skip")  # once per run
    ds = make_dataset(examples, spec, collate_fn)   # shuffle(seed) -> repeat(epochs) -> batches
    it = iter(ds); batch = next(it); state = it.get_state()   # JSON-able dict
    it2 = iter(make_dataset(...)); it2.set_state(state)        # continues at the exact next example

Rendering is the expensive part (image decode + resize, or a vLLM round trip), so it happens once
per run and rendered examples (uint8 pixels) stay in memory; epochs, shuffles and resumes reuse
them. For datasets too large to render at start-up, pass `LazyRenderedRecords(records, renderer,
...)` instead of a list: records render on first use (in the prefetch thread), cached or not. Per-host sharding gives every host the same number of examples (the remainder is dropped)
so hosts step in lockstep.
"""

from __future__ import annotations

import atexit
import collections.abc
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import weakref
from typing import Callable

import grain

from jaxrl_vl.data import batching
from jaxrl_vl.data.render import RenderedExample, Renderer, render_record
from jaxrl_vl.data.validation import (BadRecordError, DataReport, check_on_bad_record, check_record_schema,
                                      handle_bad_record, load_record_images)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """batch_size: rows per step, all processes together (this process collates batch_size /
    process_count of them). packing: first-fit several examples per row of max_length tokens (rows fixed at
    max_length) instead of one example per row (rows padded to a length bucket). num_epochs None repeats
    forever."""

    batch_size: int
    max_length: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    packing: bool = False
    drop_remainder: bool = True
    prefetch_batches: int = 2
    process_index: int = 0
    process_count: int = 1


def render_one(record: dict, renderer: Renderer, *, max_length: int, truncate: bool = True) -> tuple[RenderedExample, bool]:
    """Validate, load images, render and truncate one record. Raises BadRecordError naming its id."""
    check_record_schema(record)
    loaded = load_record_images(record)
    try:
        example = render_record(renderer, loaded)
    except BadRecordError:
        raise
    except Exception as err:  # template/processor/server errors: name the record, keep the cause
        raise BadRecordError(record["id"], f"render: {type(err).__name__}: {err}") from err
    return batching.truncate_example(example, max_length, truncate=truncate)


def _render_or_error(record, renderer, max_length, truncate):
    try:
        return render_one(record, renderer, max_length=max_length, truncate=truncate)
    except BadRecordError as err:
        return err


def render_records(records: list[dict], renderer: Renderer, *, max_length: int, truncate: bool = True,
                   on_bad_record: str = "skip", report: DataReport | None = None,
                   num_threads: int = 1) -> list[RenderedExample]:
    """Render every record once, in order. Bad records are skipped (counted in `report`, logged
    with their id) or raise, per `on_bad_record`; one summary warning reports truncations and
    skips. num_threads > 1 renders concurrently (worth it with VLLMRenderer: server round trips)."""
    check_on_bad_record(on_bad_record)
    report = report if report is not None else DataReport()
    render = functools.partial(_render_or_error, renderer=renderer, max_length=max_length, truncate=truncate)
    if num_threads > 1:
        with concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="render") as pool:
            results = list(pool.map(render, records))
    else:
        results = map(render, records)
    examples = []
    for result in results:
        if isinstance(result, BadRecordError):
            handle_bad_record(result, on_bad_record, report)
            continue
        example, was_truncated = result
        report.num_ok += 1
        report.num_truncated += int(was_truncated)
        examples.append(example)
    if report.num_truncated or report.num_skipped:
        log.warning("data: %d of %d records truncated to max_length=%d tokens, %d skipped (%s)",
                    report.num_truncated, len(records), max_length, report.num_skipped, report.summary())
    if not examples:
        raise ValueError(f"no usable records out of {len(records)}: {report.summary()}")
    return examples


class LazyRenderedRecords(collections.abc.Sequence):
    """Records rendered on first access instead of all up front (for datasets too large to render
    at start-up). Item i is record i's RenderedExample, or None when it is a skipped bad record.
    keep_in_memory caches each result, so every record is still rendered once per run; without it
    records are re-rendered every epoch (bounded memory). make_dataset drops the Nones; with
    several hosts, skipped records make per-host counts differ (render eagerly to avoid that)."""

    def __init__(self, records: list[dict], renderer: Renderer, *, max_length: int, truncate: bool = True,
                 on_bad_record: str = "skip", report: DataReport | None = None, keep_in_memory: bool = True):
        check_on_bad_record(on_bad_record)
        self._records, self._renderer = records, renderer
        self._max_length, self._truncate, self._on_bad_record = max_length, truncate, on_bad_record
        self.report = report if report is not None else DataReport()
        self._cache: dict[int, RenderedExample | None] | None = {} if keep_in_memory else None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RenderedExample | None:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        result = _render_or_error(self._records[index], self._renderer, self._max_length, self._truncate)
        with self._lock:
            if isinstance(result, BadRecordError):
                handle_bad_record(result, self._on_bad_record, self.report)
                example = None
            else:
                example, was_truncated = result
                self.report.num_ok += 1
                self.report.num_truncated += int(was_truncated)
            if self._cache is not None:
                self._cache[index] = example
        return example


class _PackedBatchIterator(grain.DatasetIterator):
    """Pulls examples and places each into the first of `num_rows` rows with room (first fit).
    A batch ends when an example fits nowhere; that example opens the next batch. The state is the
    parent's state from before that pending example was pulled, so a restore re-reads it."""

    def __init__(self, parent, num_rows: int, row_length: int, drop_remainder: bool):
        super().__init__(parent)
        self._num_rows, self._row_length, self._drop_remainder = num_rows, row_length, drop_remainder
        self._pending = None
        self._pending_state = None

    def __next__(self) -> list[list[RenderedExample]]:
        rows: list[list[RenderedExample]] = [[] for _ in range(self._num_rows)]
        used = [0] * self._num_rows
        exhausted = False
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    self._pending = next(self._parent)
                except StopIteration:
                    exhausted = True
                    break
                self._pending_state = state
            target = batching.first_fit(used, self._pending.num_tokens, self._row_length)
            if target is None:
                break
            rows[target].append(self._pending)
            used[target] += self._pending.num_tokens
            self._pending = None
        if not any(rows) or (exhausted and self._drop_remainder and not all(rows)):
            raise StopIteration
        return rows

    def get_state(self) -> dict:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self._pending_state = None


class _PackedBatchDataset(grain.IterDataset):
    def __init__(self, parent, num_rows: int, row_length: int, drop_remainder: bool):
        super().__init__(parent)
        self._args = (num_rows, row_length, drop_remainder)

    def __iter__(self):
        return _PackedBatchIterator(self._parent.__iter__(), *self._args)


_LIVE_PREFETCH_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_live_prefetch_iterators() -> None:
    """grain's prefetch thread, still blocked on a full buffer at interpreter exit, aborts the
    process ("terminate called without an active exception", exit code 134); closing first avoids it."""
    for iterator in list(_LIVE_PREFETCH_ITERATORS):
        iterator.close()
        # its __del__ closes again during module teardown, when grain's module globals are gone
        # ("Exception ignored ... 'NoneType' object has no attribute 'DatasetIterator'")
        iterator.close = lambda: None


class _PrefetchDataset(grain.experimental.ThreadPrefetchIterDataset):
    """Thread prefetch whose iterators are closed at exit (see above); state is grain's own."""

    def __iter__(self):
        iterator = super().__iter__()
        _LIVE_PREFETCH_ITERATORS.add(iterator)
        return iterator


def host_examples(num_examples: int, spec: PipelineSpec) -> grain.MapDataset:
    """The example indices this process reads, in order: every process walks the same shuffled, repeated
    stream and takes every process_count-th index from its own (so each global step's examples are the same
    whatever the process count); finite streams are cut to whole global batches, so all hosts step in
    lockstep."""
    if not 0 <= spec.process_index < spec.process_count:
        raise ValueError(f"process_index {spec.process_index} not in [0, {spec.process_count})")
    if spec.batch_size % spec.process_count:
        raise ValueError(f"batch_size={spec.batch_size} rows do not split over {spec.process_count} processes; "
                         "make train.batch_size a multiple of the process count")
    ds = grain.MapDataset.source(list(range(num_examples)))
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)  # reshuffled every epoch (grain mixes the epoch into the seed)
    ds = ds.repeat(spec.num_epochs)
    if spec.num_epochs is not None and spec.process_count > 1:
        ds = ds[:len(ds) - len(ds) % spec.batch_size]
    return ds[spec.process_index::spec.process_count]


def make_dataset(examples: "list[RenderedExample] | LazyRenderedRecords", spec: PipelineSpec,
                 collate_fn: Callable[[list[list[RenderedExample]]], object]) -> grain.IterDataset:
    """Rendered examples -> IterDataset of `collate_fn(rows)` where rows is this process's list of
    batch_size / process_count lists of examples (one example per row unless packing). Only with
    drop_remainder off does the last batch differ: fewer rows (unpacked) or some empty rows (packed).
    Iterate with `iter(ds)`; the iterator has get_state/set_state (a small JSON-able dict).

    Several processes: see host_examples. Packed batch counts depend on example lengths and can differ
    per host, so use num_epochs=None (the step count then decides the end) when packing on several hosts."""
    if spec.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {spec.batch_size}")
    if not isinstance(examples, LazyRenderedRecords):  # lazy ones are truncated as they render
        too_long = [e.id for e in examples if e.num_tokens > spec.max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} examples exceed max_length={spec.max_length} (e.g. {too_long[:3]}); "
                             "render with the same max_length")
    if not len(examples):
        raise ValueError("no examples to train on")
    rows = spec.batch_size // spec.process_count
    ds = host_examples(len(examples), spec).map(examples.__getitem__).filter(lambda example: example is not None)
    # One reader keeps the order (and so the resume point) trivially deterministic; rendering
    # (lazy mode) and collation still run ahead in the batch-prefetch thread.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if spec.packing:
        iter_ds = _PackedBatchDataset(iter_ds, rows, spec.max_length, spec.drop_remainder)
    else:
        iter_ds = iter_ds.batch(rows, drop_remainder=spec.drop_remainder,
                                batch_fn=lambda items: [[item] for item in items])
    iter_ds = iter_ds.map(collate_fn)
    if spec.prefetch_batches > 0:
        iter_ds = _PrefetchDataset(iter_ds, prefetch_buffer_size=spec.prefetch_batches)
    return iter_ds


def host_spec(**kwargs) -> PipelineSpec:
    """A PipelineSpec for this JAX process (process_index/count from jax)."""
    import jax

    return PipelineSpec(process_index=jax.process_index(), process_count=jax.process_count(), **kwargs)
