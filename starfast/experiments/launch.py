"""Launchers: where the cells of a sweep run.

A launcher is an executor in the sense of :mod:`concurrent.futures`: ``submit(call)`` returns an
object whose ``result()`` waits for the call's value (or raises its error). Three are built by
:func:`make_executor`:

- ``local`` (the default): :class:`InProcess`, the cells one after another in this process, each
  run when its result is asked for (so a progress bar can tick per point); with ``workers`` > 1 a
  :class:`concurrent.futures.ProcessPoolExecutor` (spawned processes) runs that many cells at once
  (each worker exits when the launcher's process is gone, however it ended);
- ``submitit``: a ``submitit.AutoExecutor`` (Slurm where it is found, else local processes), whose
  parameters (``slurm_partition``, ``timeout_min``, ``gpus_per_node``...) come from
  ``--launcher-kw``; submitit is imported only when this launcher is chosen. A pre-empted or
  timed-out job is resubmitted (:meth:`CellTask.checkpoint`) and resumes from its run directory.

:func:`run_cells` submits every cell, then collects each one's points or its error; cells never
share a run directory (each holds its directory's lock while it runs), so they can run anywhere at
once.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

from starfast.experiments.cells import CellTask

LAUNCHERS = ("local", "submitit")


class LauncherError(RuntimeError):
    """A launcher cannot be made (a missing optional dependency, a bad option)."""


class _Deferred:
    """The future of :class:`InProcess`: runs its call the first time its result is asked for."""

    def __init__(self, call: Callable[[], Any]):
        self._call = call
        self._outcome: Tuple[bool, Any] = (False, None)
        self._done = False

    def result(self) -> Any:
        if not self._done:
            try:
                self._outcome = (True, self._call())
            except Exception as error:  # kept to be raised again, as a future does
                self._outcome = (False, error)
            self._done = True
        succeeded, value = self._outcome
        if not succeeded:
            raise value
        return value


class InProcess:
    """The sequential local launcher: each submitted call runs in this process, in order of
    ``result()`` calls."""

    def submit(self, call: Callable[[], Any]) -> _Deferred:
        return _Deferred(call)


def _exit_with_parent(parent: int) -> None:
    """In each worker of ``--workers``: end the process once ``parent`` is gone. A pool's workers
    otherwise outlive a launcher killed by SIGTERM or SIGKILL (and keep multiprocessing's resource
    tracker alive); their cells resume from their run directories on the next invocation."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def make_executor(launcher: str, *, workers: int = 1, folder: Union[str, Path] = ".", options: Mapping[str, Any] = ()) -> Any:
    """The executor of ``--launcher`` (see the module docstring); ``folder`` holds submitit's logs."""
    if launcher == "local":
        if options:
            raise LauncherError(f"--launcher-kw {', '.join(dict(options))} applies to --launcher submitit only")
        if workers < 1:
            raise LauncherError(f"--workers must be >= 1, got {workers}")
        if workers == 1:
            return InProcess()
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                                   initargs=(os.getpid(),))
    if launcher == "submitit":
        try:
            import submitit
        except ImportError:
            raise LauncherError("--launcher submitit needs the submitit package: pip install submitit "
                                "(or use --launcher local)") from None
        executor = submitit.AutoExecutor(folder=str(folder))
        try:
            executor.update_parameters(**dict(options))
        except (TypeError, ValueError) as error:
            raise LauncherError(f"--launcher-kw: submitit refused the parameters {dict(options)}: {error}") from None
        return executor
    raise LauncherError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def run_cells(tasks: Sequence[CellTask], executor: Any, *, on_point: Callable[[], None] = lambda: None,
              ) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, str]]:
    """Submit every task, then wait for each: ``(points per cell key, error message per cell key)``.
    ``on_point`` ticks once per point: as it is measured when the executor is :class:`InProcess`,
    when its cell finishes otherwise."""
    in_process = isinstance(executor, InProcess)
    futures = [executor.submit(replace(task, on_point=on_point) if in_process else task) for task in tasks]
    points: Dict[str, List[Dict[str, Any]]] = {}
    errors: Dict[str, str] = {}
    for task, future in zip(tasks, futures):
        try:
            points[task.cell.key] = future.result()
        except Exception as error:  # a failed cell is reported; the other cells still count
            errors[task.cell.key] = f"{type(error).__name__}: {error}"
            continue
        if not in_process:
            for _ in task.cell.points:
                on_point()
    return points, errors
