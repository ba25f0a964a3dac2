"""A bounded request queue and the worker thread that runs the sampler, micro-batching.

The worker takes the oldest queued job, adds the queued compatible jobs (same size and sampler
settings; prompts, negative prompts and seeds may differ) and runs them as one
``LuminaSampler.generate`` call of up to ``max_rows`` images. While requests overlap (the last call
was merged, or requests arrived while it ran) it first waits up to ``batch_window`` for more; a
lone client never waits.

Seeds: a request's images must not depend on what it was batched with, so a merged call passes
each request's own initial noise (``generate(noise=...)``): exactly the noise a standalone
``generate(prompts, seed=s)`` draws. Images of a merged call match standalone ones up to float
rounding (batched matmuls, prompt padding to the longest prompt).

TeaCache decides which steps to skip from the whole batch, so jobs with ``teacache > 0`` are never
merged. Nor are dual-panel jobs (:class:`PanelJob`: a Template C grid, maybe kept to an input
image): ``generate`` takes one panel condition per call (layout, task, the known panel's reference
latents, the crop of the answer), so each runs alone; its input image is VAE-encoded by the worker,
under the same lock as the sampler call (the modules are shared).

If a merged call fails (any exception), each of its jobs is run again on its own, so a bad
request fails alone. A job whose future is cancelled (its client went away, or it timed out)
leaves the queue at once and is never run. The worker thread updates :attr:`GenerationWorker.beat`
while idle (every ``heartbeat_s``) and around each call; :meth:`GenerationWorker.problem` is what
``/healthz`` reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import LuminaError
from model.sampler import LuminaSampler, SamplerConfig
from model.sampler.conditioning import Layout, PanelCondition, Task

log = logging.getLogger(__name__)

# One sampler call at a time (the model's modules are shared).
_GENERATE_LOCK = threading.Lock()


class QueueFullError(Exception):
    """The queue holds ``queue_size`` jobs already."""


class ShuttingDownError(Exception):
    """The worker is stopping; the job was not (or will not be) run."""


@dataclass(frozen=True, eq=False)
class PanelJob:
    """A dual-panel request: its task, layout and, for image conditioning, the decoded input image
    (fitted to the known panel and encoded by the worker). Without an image the answer is the whole
    grid, with one the generated panel."""

    task: Task
    layout: Layout
    image: Any = None  # PIL image or None

    def condition(self, sampler: LuminaSampler, height: int, width: int) -> PanelCondition:
        if self.image is None:
            return PanelCondition(self.layout, self.task, output="grid")
        return PanelCondition.from_image(
            self.image, task=self.task, layout=self.layout, height=height, width=width, vae=sampler.vae
        )


@dataclass(eq=False)
class Job:
    prompts: list[str]
    negatives: list[str]
    seed: int
    height: int
    width: int
    config: SamplerConfig
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    panels: PanelJob | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one sampler call."""
        return (self.height, self.width, self.config.model_dump_json())

    @property
    def mergeable(self) -> bool:
        return self.config.teacache <= 0 and self.panels is None


@dataclass
class JobResult:
    images: list[Any]  # PIL images, one per prompt
    forward_calls: int
    merged_requests: int  # requests in the sampler call that made these images
    merged_rows: int
    queue_s: float
    generate_s: float


def generate_rows(
    sampler: LuminaSampler,
    prompts: Sequence[str],
    negatives: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    *,
    height: int,
    width: int,
    config: SamplerConfig,
    panels: PanelJob | None = None,
) -> Any:
    """One ``generate`` call where each run of rows gets its own seed's noise.

    ``seeds`` lists (seed, rows) in prompt order; rows must add up to ``len(prompts)``. ``panels``
    (one request's, one seed) makes it a dual-panel generation.
    """
    if sum(n for _, n in seeds) != len(prompts):
        raise ValueError("seed rows do not add up to the prompts")
    if panels is not None and len(seeds) != 1:
        raise ValueError("a dual-panel job runs alone")
    if len(seeds) == 1:
        with _GENERATE_LOCK:
            extra = {} if panels is None else {"condition": panels.condition(sampler, height, width)}
            return sampler.generate(
                list(prompts),
                negative_prompt=list(negatives),
                height=height,
                width=width,
                seed=seeds[0][0],
                config=config,
                **extra,
            )
    noise = torch.cat([sampler.initial_noise(n, height, width, s) for s, n in seeds])
    with _GENERATE_LOCK:
        result = sampler.generate(
            list(prompts),
            negative_prompt=list(negatives),
            height=height,
            width=width,
            config=config,
            noise=noise,
        )
    return result


class GenerationWorker:
    """Bounded FIFO of :class:`Job` and one thread running them, micro-batched."""

    def __init__(
        self,
        sampler: LuminaSampler,
        *,
        queue_size: int,
        max_rows: int,
        batch_window_s: float = 0.0,
        micro_batch: bool = True,
        on_depth: Callable[[int], None] | None = None,
        on_call: Callable[[int, int, float], None] | None = None,
        heartbeat_s: float = 1.0,
    ):
        self.sampler = sampler
        self.queue_size = queue_size
        self.max_rows = max_rows
        self.batch_window_s = batch_window_s
        self.micro_batch = micro_batch
        self._on_depth = on_depth or (lambda depth: None)
        self._on_call = on_call or (lambda requests, rows, seconds: None)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: list[Job] = []
        self._contended = False  # requests overlapped recently: worth waiting batch_window for more
        self.heartbeat_s = heartbeat_s
        self.beat = time.monotonic()  # last time the worker thread showed it was not stuck
        self.dropped = 0  # cancelled jobs taken out of the queue unrun
        self._thread = threading.Thread(target=self._loop, name="lumina-worker", daemon=True)

    # ------------------------------------------------------------------ producer side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise ShuttingDownError("server is shutting down")
            if self._thread.ident is not None and not self._thread.is_alive():
                raise ShuttingDownError("the generation worker is not running")
            if len(self._pending) >= self.queue_size:
                raise QueueFullError(f"queue full ({self.queue_size} requests waiting)")
            self._pending.append(job)
            if self._running:
                self._contended = True  # arrived while the worker was busy
            self._on_depth(len(self._pending))
            self._cond.notify_all()
        job.future.add_done_callback(lambda future: self._discard(job) if future.cancelled() else None)
        return job.future

    def _discard(self, job: Job) -> None:
        """A cancelled job leaves the queue (it is never run and frees its place)."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.dropped += 1
                self._on_depth(len(self._pending))

    def problem(self, max_silence_s: float) -> str | None:
        """Why the worker is not live (``None`` when it is): its thread ended while the server
        is not stopping, or it has been silent (one job, or a stuck loop) for ``max_silence_s``."""
        if self._thread.ident is None or self._closed:
            return None
        if not self._thread.is_alive():
            return "the generation worker thread has died"
        silent = time.monotonic() - self.beat
        if silent > max_silence_s:
            doing = "running one sampler call" if self._running else "not responding"
            return f"the generation worker has been {doing} for {silent:.0f} s (bound {max_silence_s:g} s)"
        return None

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def stop(self, timeout: float = 30.0) -> int:
        """Refuse new jobs, cancel the queued ones (they fail with :class:`ShuttingDownError`),
        let the running call finish (up to ``timeout``). Returns how many were cancelled."""
        with self._cond:
            self._closed = True
            cancelled = list(self._pending)
            self._pending.clear()
            self._on_depth(0)
            self._cond.notify_all()
        for job in cancelled:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDownError("server is shutting down; request not run"))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return len(cancelled)

    # ------------------------------------------------------------------ worker side
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self.beat = time.monotonic()
                self._cond.wait(self.heartbeat_s)
            self.beat = time.monotonic()
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch, rows = [first], len(first.prompts)
            if self.micro_batch and first.mergeable:
                # wait for more only under concurrent load: a lone client never pays the window
                deadline = time.monotonic() + (self.batch_window_s if self._contended else 0.0)
                while rows < self.max_rows and not self._closed:
                    for job in list(self._pending):
                        if (
                            job.mergeable
                            and job.key == first.key
                            and rows + len(job.prompts) <= self.max_rows
                        ):
                            self._pending.remove(job)
                            batch.append(job)
                            rows += len(job.prompts)
                    remaining = deadline - time.monotonic()
                    if rows >= self.max_rows or remaining <= 0:
                        break
                    self._cond.wait(remaining)
            self._contended = len(batch) > 1 or bool(self._pending)
            self._running = batch
            self._on_depth(len(self._pending))
            return batch

    def _loop(self) -> None:
        while True:
            try:
                batch = self._take()
            except BaseException:  # a bug: the thread ends, /healthz reports it (503), k8s restarts
                log.critical("the generation worker thread died", exc_info=True)
                return
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as exc:  # never let the worker die with jobs waiting on it
                log.exception("worker failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self._running = []
                self.beat = time.monotonic()

    def _run(self, batch: list[Job]) -> None:
        runnable = [job for job in batch if job.future.set_running_or_notify_cancel()]
        self.dropped += len(batch) - len(runnable)
        batch = runnable
        if not batch:
            return
        if len(batch) > 1:
            try:
                self._call(batch)
                return
            except Exception as exc:  # any failure: run each job alone so a bad request fails alone
                kind = "" if isinstance(exc, LuminaError) else f" ({type(exc).__name__}: {exc})"
                log.info("merged call of %d requests failed%s; running them one by one", len(batch), kind)
        for job in batch:
            try:
                self._call([job])
            except Exception as exc:
                job.future.set_exception(exc)

    def _call(self, batch: list[Job]) -> None:
        first = batch[0]
        self.beat = time.monotonic()  # the liveness bound is per sampler call
        start = time.perf_counter()
        result = generate_rows(
            self.sampler,
            [p for job in batch for p in job.prompts],
            [n for job in batch for n in job.negatives],
            [(job.seed, len(job.prompts)) for job in batch],
            height=first.height,
            width=first.width,
            config=first.config,
            panels=first.panels,
        )
        seconds = time.perf_counter() - start
        rows = sum(len(job.prompts) for job in batch)
        self._on_call(len(batch), rows, seconds)
        offset = 0
        for job in batch:
            images = list(result.images[offset : offset + len(job.prompts)])
            offset += len(job.prompts)
            job.future.set_result(
                JobResult(
                    images=images,
                    forward_calls=result.forward_calls,
                    merged_requests=len(batch),
                    merged_rows=rows,
                    queue_s=start - job.enqueued,
                    generate_s=seconds,
                )
            )
