"""Prometheus metrics in the text exposition format (0.0.4), thread-safe, no extra dependency."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.labelnames), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [*self.header(), *(f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items)]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return self._value

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_num(self._value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), buckets: Iterable[float] = ()):
        super().__init__(name, help, labels)
        self.buckets = (*sorted(buckets), math.inf)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> float:
        series = self._series.get(tuple(str(labels[n]) for n in self.labelnames))
        return series[-1] if series else 0.0

    def mean(self) -> float | None:
        """Mean observed value over all label sets (``None`` before any observation)."""
        with self._lock:
            total = sum(series[-2] for series in self._series.values())
            count = sum(series[-1] for series in self._series.values())
        return total / count if count else None

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            for bound, count in zip(self.buckets, series, strict=False):
                le = f'le="{_num(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(count)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(series[-1])}")
        return lines


class ServerMetrics:
    """The server's metrics; one instance per app."""

    def __init__(self) -> None:
        self.request_latency = Histogram(
            "lumina_request_duration_seconds",
            "HTTP request latency by route, method and status",
            ("path", "method", "status"),
            LATENCY_BUCKETS,
        )
        self.queue_depth = Gauge("lumina_queue_depth", "requests waiting for the generation worker")
        self.images = Counter("lumina_images_generated_total", "images generated")
        self.errors = Counter(
            "lumina_request_errors_total", "HTTP responses with an error status", ("status",)
        )
        self.batches = Counter("lumina_generate_calls_total", "sampler calls made by the worker")
        self.batch_requests = Histogram(
            "lumina_requests_per_generate_call",
            "requests merged into one sampler call",
            buckets=(1, 2, 4, 8, 16, 32),
        )
        self.generate_seconds = Histogram(
            "lumina_generate_seconds", "sampler wall time per call", buckets=LATENCY_BUCKETS
        )
        self.ready = Gauge("lumina_model_ready", "1 once the model is loaded")

    def render(self) -> str:
        metrics = (
            self.request_latency,
            self.queue_depth,
            self.images,
            self.errors,
            self.batches,
            self.batch_requests,
            self.generate_seconds,
            self.ready,
        )
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
