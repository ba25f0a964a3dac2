"""What the app holds at run time: settings, metrics, the sampler loaded in a background thread
and its generation worker (see :mod:`serving.worker`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import LuminaError
from model.sampler import LuminaSampler
from serving.fetch import resolve_source
from serving.metrics import ServerMetrics
from serving.settings import ServerSettings, ServingDefaults
from serving.worker import GenerationWorker

log = logging.getLogger(__name__)

SamplerFactory = Callable[[Path], LuminaSampler]


class Runtime:
    """What the app holds: settings, metrics, the loaded sampler and its worker."""

    def __init__(
        self,
        settings: ServerSettings,
        defaults: ServingDefaults,
        sampler_factory: SamplerFactory | None,
        on_load_error: Callable[[BaseException], None] | None,
    ):
        self.settings = settings
        self.defaults = defaults
        self.metrics = ServerMetrics()
        self.token = settings.token()
        self.device = settings.resolved_device()
        self.sampler_factory = sampler_factory or (
            lambda folder: LuminaSampler.load(folder, device=self.device)
        )
        self.on_load_error = on_load_error
        self.ready = threading.Event()
        self.sampler: LuminaSampler | None = None
        self.worker: GenerationWorker | None = None
        self.folder: Path | None = None
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self._loader: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="lumina-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        start = time.perf_counter()
        source = self.settings.model_source or ""
        try:
            folder = resolve_source(source, self.settings.model_dir)
            sampler = self.sampler_factory(folder)
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, LuminaError) else f"{type(exc).__name__}: {exc}"
            log.error("model load failed: %s", self.error)
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        if self._stopping:
            return
        self.folder, self.sampler = folder, sampler
        self.info = model_info(sampler, source, folder, self.device, time.perf_counter() - start)
        d = self.defaults
        self.worker = GenerationWorker(
            sampler,
            queue_size=d.queue_size,
            max_rows=d.merge_rows or d.max_batch,
            batch_window_s=d.batch_window_ms / 1000.0,
            micro_batch=d.micro_batch,
            on_depth=self.metrics.queue_depth.set,
            on_call=self._record_call,
            heartbeat_s=min(1.0, d.liveness_timeout_s / 4),  # idle beats well inside the bound
        )
        self.worker.start()
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("model ready: %s (%s) in %.1f s", source, folder, self.info["load_seconds"])

    def liveness_problem(self) -> str | None:
        """Why the server is not live: the worker thread died or is stuck (``None``: it is live;
        also while the model loads or after a failed load, which ``/readyz`` reports)."""
        worker = self.worker
        if worker is None or self._stopping:
            return None
        return worker.problem(self.defaults.liveness_timeout_s)

    def _record_call(self, requests: int, rows: int, seconds: float) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_requests.observe(requests)
        self.metrics.generate_seconds.observe(seconds)
        self.metrics.images.inc(rows)

    def stop(self) -> None:
        self._stopping = True
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.worker is not None:
            cancelled = self.worker.stop()
            if cancelled:
                log.info("shutdown: cancelled %d queued requests", cancelled)


def _count(module: Any) -> int:
    try:
        return sum(p.numel() for p in module.parameters())
    except AttributeError:
        return 0


def model_info(sampler: LuminaSampler, source: str, folder: Path, device: str, seconds: float) -> dict:
    from model.profiles import PROFILES

    cfg = sampler.transformer.config
    profile = next(
        (
            name
            for name, p in PROFILES.items()
            if (p.transformer.hidden_size, p.transformer.num_layers, p.transformer.num_attention_heads)
            == (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads)
        ),
        "custom",
    )
    return {
        "source": source,
        "folder": str(folder),
        "profile": profile,
        "transformer_params": _count(sampler.transformer),
        "text_encoder_params": _count(getattr(sampler, "text_encoder", None)),
        "vae_params": _count(getattr(sampler, "vae", None)),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(seconds, 3),
    }
