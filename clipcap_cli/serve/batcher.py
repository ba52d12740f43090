"""Dynamic batching: one worker thread owns the model and captions concurrent requests together.

Requests ``submit`` one preprocessed image with its decoding options and get a
``concurrent.futures.Future``. The worker takes the first waiting job, then gathers more until it holds
``max_batch`` images or ``max_wait_ms`` have passed since it took the first; jobs that asked for other
decoding options wait for a batch of their own (they are never decoded with options they did not ask
for). While a batch runs, new requests queue up and form the next one, so under load batches fill
without waiting. An error in a batch fails that batch's futures only: the worker goes on.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clipcap_cli.captioner import Captioner
    from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult

# (pixels of the batch's images, their options) -> one result per image, in order
RunBatch = Callable[[Sequence["torch.Tensor"], "DecodingOptions"], Sequence["DecodingResult"]]


class BatcherClosed(RuntimeError):
    """The server is shutting down: no new work is taken."""


@dataclass(eq=False)  # identity: a job is removed from the queue as itself
class _Job:
    pixels: Any  # torch.Tensor (3, H, W): the image after CLIP's preprocess
    options: DecodingOptions
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0  # model runs
    images: int = 0  # images captioned in them
    largest: int = 0  # the largest batch

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


def captioner_runner(captioner: Captioner) -> RunBatch:
    """Caption a batch with ``captioner``: CLIP on the stacked pixels, then one decoding call.

    Every image is image 0 of its own request, so a sampled caption with a seed is the one
    ``clipcap caption --seed S`` gives that image alone, whatever else shares the batch.
    """

    def run(pixels: Sequence[torch.Tensor], options: DecodingOptions) -> Sequence[DecodingResult]:
        import torch

        with torch.inference_mode():
            emb = captioner.encode_pixels(torch.stack(list(pixels)).to(captioner.device))
            return captioner.decode(emb, options, image_ids=[0] * len(pixels))

    return run


class Batcher:
    """The worker thread and its queue. Use as a context manager, or ``start()`` and ``close()``."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 16, max_wait_ms: float = 10.0):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._open = 0  # submitted, not yet answered
        self._thread = threading.Thread(target=self._work, name="clipcap-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def __enter__(self) -> Batcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        with self._cond:
            return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not answered yet (queued, being gathered, or running)."""
        with self._cond:
            return self._open

    def submit(self, pixels: torch.Tensor, options: DecodingOptions) -> Future:
        """Queue one image; the future's result is its ``DecodingResult``. ``future.cancel()`` drops a
        job the worker has not taken yet (a request that timed out)."""
        job = _Job(pixels, options)
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            self._queue.append(job)
            self._open += 1
            self._cond.notify()
        job.future.add_done_callback(self._answered)
        return job.future

    def _answered(self, _: Future) -> None:
        with self._cond:
            self._open -= 1

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._run(batch)

    def _gather(self) -> list[_Job] | None:
        """The next batch: jobs with the first waiting job's options, at most ``max_batch``, gathered
        for at most ``max_wait`` after it was taken. None when closing and nothing is left."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                for job in [j for j in self._queue if j.options == first.options][: self.max_batch - len(batch)]:
                    self._queue.remove(job)
                    batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drops cancelled jobs
        if not live:
            return
        try:
            results = list(self.run_batch([job.pixels for job in live], live[0].options))
            if len(results) != len(live):
                raise RuntimeError(f"the model returned {len(results)} results for {len(live)} images")
        except BaseException as exc:  # noqa: BLE001  (the worker must outlive any failure of a batch)
            for job in live:
                job.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.images += len(live)
        self.stats.largest = max(self.stats.largest, len(live))
        for job, result in zip(live, results):
            job.future.set_result(result)
