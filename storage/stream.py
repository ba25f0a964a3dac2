"""Ordered, bounded parallel reading: the read-ahead window every streaming step uses."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, computed on ``workers`` threads with at most ``window``
    items submitted ahead of the consumer (so memory stays bounded whatever the input's length).
    ``fn`` should report per-item failures in its result: an exception it raises ends the stream."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, window):
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
