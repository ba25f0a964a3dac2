"""Process settings every entry point shares: the CLIs (:func:`common.cli.run_cli`) and the pipeline
steps (:func:`start_step`)."""

from __future__ import annotations

import atexit
import gc

from common.logs import configure_logging_if_requested

_exit_collection_skipped = False


def skip_exit_collection() -> None:
    """Freeze the heap at exit, so the interpreter's final garbage collection skips it.

    A process that imported torch, diffusers, DeepSpeed and MLflow holds millions of tracked objects;
    collecting them at exit took 1.3 s (a step that only imported them) to 3.0 s (a training stage)
    of every task, and the result is thrown away with the process. The freeze runs after the atexit
    handlers registered later (MLflow ending its run, logging flushing its handlers); reference
    counting still closes files and runs finalizers. Calling it again does nothing."""
    global _exit_collection_skipped
    if not _exit_collection_skipped:
        atexit.register(gc.freeze)
        _exit_collection_skipped = True


def start_step() -> None:
    """What every pipeline step runs first: JSON logs when the task asks for them
    (:func:`common.logs.configure_logging_if_requested`) and :func:`skip_exit_collection`."""
    configure_logging_if_requested()
    skip_exit_collection()
