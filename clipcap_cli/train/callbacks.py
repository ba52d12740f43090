"""How a training run reports: the ``TrainCallback`` hooks, what they receive, and the callback
that writes ``metrics.jsonl``.

The loop never prints and never writes logs itself: the CLI's progress bar, the metrics file and
the tests' probes are all callbacks. Imports nothing heavy (the CLI subclasses these at import).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Sequence

from clipcap_cli.fsutil import write_text_atomic

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

METRICS_FILE = "metrics.jsonl"


@dataclass
class StartInfo:
    out_dir: Path
    total_steps: int
    steps_per_epoch: int
    start_step: int  # > 0 when resumed
    epochs: int
    train_samples: int  # captions (per epoch, all processes)
    val_samples: int
    world_size: int
    global_batch: int  # samples per optimizer step, all processes
    device: str
    precision: str
    trainable_params: int
    truncated: int  # captions cut to max_tokens
    max_tokens: int
    # The metrics log's open window (losses and seconds since its last line), kept in the resume
    # state so that a resumed run writes the same lines as an uninterrupted one. Mutable: shared.
    log_window: dict[str, Any] = field(default_factory=lambda: {"losses": [], "seconds": 0.0})
    stopped_early: bool = False  # a resumed run that --early-stop had already ended


@dataclass
class StepInfo:
    step: int  # optimizer steps done (1-based after the first step)
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float  # this step's loss (mean over processes)
    loss_ema: float  # smoothed, for display
    lr: float  # the lr this step used
    samples_per_s: float
    elapsed: float  # seconds of training so far (across resumes)
    seconds: float = 0.0  # this step's wall time
    caption_ids: torch.Tensor | None = None  # (n,) int64 on the CPU: the captions this process trained on


@dataclass
class TrainResult:
    out_dir: Path
    checkpoints: list[Path]  # epoch checkpoints written by this call
    step: int
    train_loss: float | None  # smoothed loss at the end
    val_loss: float | None  # last validation loss
    best: Path | None = None  # best.safetensors: the lowest held-out loss so far (None without validation)
    best_val_loss: float | None = None
    best_epoch: int = 0  # 1-based; 0 = none
    stopped_early: bool = False  # --early-stop ended the run before its last epoch
    report: Path | None = None  # report.html


@dataclass(frozen=True)
class Sample:
    """One image captioned at an epoch's end, to see what the model says (``samples.jsonl``)."""

    image: str  # the store's record "image" (relative to the store's images_root)
    references: tuple[str, ...]  # the record's captions
    caption: str  # generated, greedy
    split: str = "val"  # "val": a held-out image; "train": a training image (the run has no held-out split)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "references": list(self.references), "caption": self.caption, "split": self.split}


class TrainCallback:
    """Hooks the loop calls. Override what you need.

    They run on the main process (rank 0) only, unless ``all_ranks`` is True: then on every
    process of a torchrun job (each sees its own ``caption_ids`` and its own model), except
    ``on_tokenize``, ``on_checkpoint`` and ``on_samples``, which report work only rank 0 does. An exception in a
    hook stops the run on every process, with its message.
    """

    all_ranks = False

    def on_tokenize(self, done: int, total: int) -> None: ...  # captions tokenised so far (not when cached)
    def on_start(self, info: StartInfo) -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_validation(self, epoch: int, step: int, loss: float) -> None: ...
    def on_checkpoint(self, path: Path, kind: str) -> None: ...  # kind: "epoch" | "resume" | "best"
    def on_samples(self, epoch: int, step: int, samples: Sequence[Sample]) -> None: ...  # after validation
    def on_warning(self, message: str) -> None: ...
    def on_end(self, result: TrainResult, model: ClipCaptionModel) -> None: ...  # after the last epoch


class Callbacks(TrainCallback):
    """Several callbacks as one: each hook calls them in order, on the processes they asked for."""

    def __init__(self, callbacks: Sequence[TrainCallback | None], main: bool):
        self.callbacks = [c for c in callbacks if c is not None and (main or c.all_ranks)]

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def on_tokenize(self, done: int, total: int) -> None:
        self._each("on_tokenize", done, total)

    def on_start(self, info: StartInfo) -> None:
        self._each("on_start", info)

    def on_step(self, info: StepInfo) -> None:
        self._each("on_step", info)

    def on_validation(self, epoch: int, step: int, loss: float) -> None:
        self._each("on_validation", epoch, step, loss)

    def on_checkpoint(self, path: Path, kind: str) -> None:
        self._each("on_checkpoint", path, kind)

    def on_samples(self, epoch: int, step: int, samples: Sequence[Sample]) -> None:
        self._each("on_samples", epoch, step, samples)

    def on_warning(self, message: str) -> None:
        self._each("on_warning", message)

    def on_end(self, result: TrainResult, model: ClipCaptionModel) -> None:
        self._each("on_end", result, model)


class MetricsLog(TrainCallback):
    """``metrics.jsonl``: a "train" line every ``log_every`` steps and at each epoch's end (means over
    the steps since the last line), and a "val" line after each validation."""

    def __init__(self, out_dir: Path, log_every: int, global_batch: int):
        self.path = out_dir / METRICS_FILE
        self.log_every = log_every
        self.global_batch = global_batch
        self.file: IO[str] | None = None
        self.steps_per_epoch = 1
        self.window: dict[str, Any] = {"losses": [], "seconds": 0.0}  # since the last line (StartInfo's)

    def on_start(self, info: StartInfo) -> None:
        self.steps_per_epoch = info.steps_per_epoch
        self.window = info.log_window
        if info.start_step:
            self._truncate(info.start_step)
        else:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        """Keep the lines up to the resumed step: the file then describes one continuous run.

        A crash can leave a torn last line; it is dropped, like the lines past the resume point.
        """
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                keep.append(line + "\n")
        write_text_atomic(self.path, "".join(keep))

    def on_step(self, info: StepInfo) -> None:
        losses = self.window["losses"]
        losses.append(info.loss)
        self.window["seconds"] += info.seconds
        if info.step % self.log_every and info.step % self.steps_per_epoch:
            return
        self._write(
            {
                "type": "train",
                "step": info.step,
                "epoch": round(info.step / self.steps_per_epoch, 4),
                "loss": sum(losses) / len(losses),
                "loss_ema": info.loss_ema,
                "lr": info.lr,
                "samples_per_s": self.global_batch * len(losses) / max(self.window["seconds"], 1e-9),
                "time": time.time(),
            }
        )
        losses.clear()
        self.window["seconds"] = 0.0

    def on_validation(self, epoch: int, step: int, loss: float) -> None:
        self._write({"type": "val", "step": step, "epoch": epoch, "val_loss": loss, "time": time.time()})

    def _write(self, record: dict) -> None:
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
