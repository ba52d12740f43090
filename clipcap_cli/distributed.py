"""This process's place in a torchrun job: the one reader of torchrun's environment, and the few
collective operations clipcap uses (counts, barriers, gathers; no home-made cluster code).

A process not started by torchrun is a job of one, and every operation is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from clipcap_cli.errors import ClipCapError, UsageError

if TYPE_CHECKING:
    import torch


class Place(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1  # processes torchrun started on this machine

    @property
    def launched(self) -> bool:
        """Started by torchrun with more than one process."""
        return self.world_size > 1


def env() -> Place:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them; (0, 1, 0, 1) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as exc:
        raise UsageError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return Place(rank, world, local, max(1, local_world))


def local_device() -> str | None:
    """The GPU torchrun gave this process (cuda:LOCAL_RANK), or None outside torchrun or without CUDA."""
    place = env()
    if not place.launched:
        return None
    import torch

    return f"cuda:{place.local_rank}" if torch.cuda.is_available() else None


@dataclass
class Distributed:
    """This process's place in a torchrun job (or a job of one)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, requested_device: str | None) -> Distributed:
        """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
        import torch

        from clipcap_cli.device import pick_device

        place = env()
        if place.world_size <= 1:
            return cls(device=pick_device(requested_device))
        import torch.distributed as dist

        rank, world, local_rank = place.rank, place.world_size, place.local_rank
        use_cuda = torch.cuda.is_available() and (requested_device or "cuda").startswith("cuda")
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def fail_together(self) -> Iterator[None]:
        """Run a block on every process, then agree on whether it failed anywhere (one all-reduce).

        Put rank-0-only work (writing files, callbacks) inside, so that if it raises on rank 0,
        every other process stops at once with rank 0's message (``PeerFailed``) instead of
        waiting in its next collective until the backend's timeout. The failing process raises
        its own exception. KeyboardInterrupt is not caught: torchrun stops every process then.
        """
        error: Exception | None = None
        try:
            yield
        except Exception as exc:
            if not self.enabled:
                raise
            error = exc
        self._raise_if_any_failed(error)

    def _raise_if_any_failed(self, error: Exception | None) -> None:
        import torch

        failed = self.all_reduce_sum(torch.tensor([float(error is not None)], device=self.device))
        if not failed.item():
            return
        reports = self.all_gather(None if error is None else (_one_line(error), getattr(error, "exit_code", 1)))
        if error is not None:
            raise error
        rank, (message, exit_code) = next((r, report) for r, report in enumerate(reports) if report is not None)
        raise PeerFailed(f"process {rank} of {self.world_size} failed: {message}", exit_code)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class PeerFailed(ClipCapError):
    """Another process of the torchrun job failed; the message is its error."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, ClipCapError) and text:
        return text[0]
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class GlobalCounts:
    """Integer counters summed over every process of the job, for progress bars and summaries.

    Outside torchrun the totals are this process's own values. Under torchrun a thread all-reduces
    them every ``interval`` seconds on a gloo group of its own (so it never meets the main thread's
    collectives), and every process keeps taking part until all have called ``close``: ranks that
    finish early wait there, and the last round's totals are final.
    """

    def __init__(self, dist: Distributed | None, size: int, on_totals: Any = None, interval: float = 1.0):
        self.values = [0] * size  # this process's counters; only its main thread changes them
        self.totals = list(self.values)
        self.on_totals = on_totals  # called with the totals (on every process) after each round
        self.interval = interval
        self._done = False
        self._dist = dist if dist is not None and dist.enabled else None
        self._thread = None
        if self._dist is not None:
            import threading

            import torch.distributed as dist_

            self._group = dist_.new_group(backend="gloo")  # collective: every rank creates it here
            self._thread = threading.Thread(target=self._loop, name="clipcap-counts", daemon=True)
            self._thread.start()

    def add(self, i: int, amount: int = 1) -> None:
        self.values[i] += amount
        if self._dist is None:
            self._publish(list(self.values))

    def _publish(self, totals: list[int]) -> None:
        self.totals = totals
        if self.on_totals is not None:
            self.on_totals(totals)

    def _loop(self) -> None:
        import time

        import torch
        import torch.distributed as dist_

        assert self._dist is not None
        while True:
            done = self._done  # read before the values: once it is set, they are final
            t = torch.tensor([*self.values, int(done)], dtype=torch.int64)
            dist_.all_reduce(t, group=self._group)
            *totals, finished = t.tolist()
            self._publish(totals)
            if finished == self._dist.world_size:
                return
            time.sleep(self.interval)

    def close(self) -> list[int]:
        """Stop counting; returns the job's final totals (waits for every process under torchrun)."""
        self._done = True
        if self._thread is not None:
            self._thread.join()
        else:
            self._publish(list(self.values))
        return self.totals
