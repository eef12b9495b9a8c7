"""The one thread that runs the model for `tc serve`, and the queue in front of it.

torch is not re-entrant on one model (hooks, frozen passes and caches live on it), so every piece of model
work (a graph, an intervention, a validation) is a ``Job`` put on one queue and run by one worker thread,
in order. A job that fails ends ``failed`` with its one-line message; the worker goes on with the next.
Requests handed in while the queue is full are refused (``QueueFull``) rather than kept waiting forever.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from tccli.errors import TcError

KEPT_JOBS = 500  # finished jobs whose state can still be asked for


class QueueFull(Exception):
    """More requests wait for the model than the server takes."""


@dataclass
class Job:
    """One piece of model work and where it stands: queued, running, done (``result``) or failed
    (``error``, one line; ``internal`` when it was a bug of ours rather than the request's)."""

    id: str
    kind: str
    run: Callable[[Job], Any]
    state: str = "queued"
    stage: str = ""
    done: int = 0
    total: int = 0
    result: Any = None
    error: Optional[str] = None
    internal: bool = False
    queued_at: float = field(default_factory=time.time)
    seconds: Optional[float] = None
    finished: threading.Event = field(default_factory=threading.Event)

    def progress(self, stage: str, done: int, total: int) -> None:
        """Called by the work itself (from the worker thread) as it goes."""
        self.stage, self.done, self.total = stage, int(done), int(total)


class ModelWorker:
    """A queue of jobs and the daemon thread that runs them one at a time."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: list[str] = []  # queued job ids, oldest first
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="tc-serve-model", daemon=True)
        self._thread.start()

    def submit(self, kind: str, run: Callable[[Job], Any]) -> Job:
        """Queue ``run(job)``; refused with QueueFull when ``max_waiting`` jobs wait already."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for the model; try again later")
            job = Job(str(next(self._ids)), kind, run)
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            while len(self._jobs) > KEPT_JOBS:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].state in ("queued", "running"):
                    break
                del self._jobs[oldest]
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def ahead(self, job: Job) -> int:
        """Jobs that will run before ``job`` (the running one included)."""
        with self._lock:
            if job.state != "queued":
                return 0
            running = any(j.state == "running" for j in self._jobs.values())
            return self._waiting.index(job.id) + int(running) if job.id in self._waiting else 0

    def describe(self, job: Job) -> dict:
        """A job's state as the server answers it."""
        out: dict = {"job": job.id, "kind": job.kind, "state": job.state}
        if job.state == "queued":
            out["ahead"] = self.ahead(job)
        if job.state == "running":
            out.update(stage=job.stage, done=job.done, total=job.total)
        if job.state == "done":
            out.update(result=job.result, seconds=job.seconds)
        if job.state == "failed":
            out.update(error=job.error, seconds=job.seconds)
        return out

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._waiting.remove(job.id)
                job.state, job.stage = "running", "starting"
            start = time.perf_counter()
            try:
                job.result = job.run(job)
                job.state = "done"
            except TcError as exc:
                job.error, job.state = str(exc), "failed"
            except Exception as exc:  # a bug of ours: the job fails, the server goes on
                job.error, job.internal, job.state = f"internal error: {type(exc).__name__}: {exc}", True, "failed"
            job.seconds = round(time.perf_counter() - start, 3)
            job.finished.set()
