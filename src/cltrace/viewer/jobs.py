"""Model-running requests, one at a time, in one worker thread, each with progress the page can poll.

Tracing and steering share the model, its transcoders and torch's threads; running two at once would at best
halve both and at worst interleave hooks on the same modules. So every such request becomes a job on one
queue served by one thread; the HTTP handler returns the job's id at once and the page polls
`GET /api/jobs/{id}` (stage, fraction done, result or error), so no request blocks the server.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from cltrace.errors import CltraceError

Progress = Callable[[str, float | None], None]


@dataclass
class Job:
    id: str
    kind: str
    fn: Callable[[Progress], dict]
    status: str = "queued"  # queued, running, done, error
    stage: str = "waiting for the model"
    fraction: float | None = None
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "stage": self.stage,
                "fraction": self.fraction, "result": self.result, "error": self.error}


class JobQueue:
    """A FIFO of jobs and the one thread that runs them; at most `max_waiting` wait at a time."""

    def __init__(self, max_waiting: int = 8, keep: int = 50):
        self.q: queue.Queue[Job | None] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.max_waiting, self.keep = max_waiting, keep
        self.ids = itertools.count(1)
        self.thread = threading.Thread(target=self._run, name="cltrace-viewer-model", daemon=True)
        self.thread.start()

    def submit(self, kind: str, fn: Callable[[Progress], dict]) -> Job:
        with self.lock:
            waiting = sum(j.status == "queued" for j in self.jobs.values())
            if waiting >= self.max_waiting:
                raise CltraceError(f"{waiting} model requests are already waiting: try again when they are done")
            job = Job(f"{next(self.ids)}-{kind}", kind, fn)
            self.jobs[job.id] = job
            done = [j for j in self.jobs.values() if j.status in ("done", "error")]
            for old in done[: max(0, len(done) - self.keep)]:
                self.jobs.pop(old.id, None)
        self.q.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def close(self) -> None:
        self.q.put(None)

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return

            def progress(stage: str, fraction: float | None = None, job=job) -> None:
                job.stage, job.fraction = stage, fraction

            job.status = "running"
            try:
                job.result = job.fn(progress)
                job.status, job.stage, job.fraction = "done", "done", 1.0
            except CltraceError as e:
                job.status, job.error = "error", str(e)
            except Exception as e:  # a bug or an unexpected input: say it, keep serving
                job.status, job.error = "error", f"{type(e).__name__}: {e}"
                traceback.print_exc()
