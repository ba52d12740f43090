"""Watching a run learn: sample captions each epoch, warnings when it does not, the best
checkpoint, early stopping, and ``report.html``.

At each epoch's end (after validation) rank 0 captions a fixed handful of held-out images
(greedy, from their stored CLIP embeddings: no CLIP is loaded), writes them to ``samples.jsonl``,
warns when every sample says the same thing or when the training loss stopped moving, keeps
``best.safetensors`` (the lowest held-out loss so far) and rewrites ``report.html``. The best loss
and the epochs since it improved live in the resume state (``state.Position``), so that
``--early-stop`` and ``best.safetensors`` carry on across ``--resume``. Nothing here prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import write_text_atomic
from clipcap_cli.train import state
from clipcap_cli.train.callbacks import METRICS_FILE, Sample, TrainCallback
from clipcap_cli.train.options import AUTO_VAL_MIN_IMAGES, TrainOptions
from clipcap_cli.weights.lm import max_positions

if TYPE_CHECKING:
    from clipcap_cli.train.data import TrainData
    from clipcap_cli.train.loop import Trainer
    from clipcap_cli.train.state import Position

SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"
BEST_FILE = "best.safetensors"
PLATEAU_TOLERANCE = 0.01  # an epoch's mean training loss within 1% of the previous epoch's has "not moved"
PLATEAU_EPOCHS = 2  # ... for this many epochs in a row: warn
THUMB_SIZE = 160  # report thumbnails, longest side in pixels
SAMPLE_MAX_LENGTH = 67  # tokens per sample caption (decoding's default), less where GPT-2's window is shorter


# --------------------------------------------------------------------------- rules (every rank)


def check_options(opts: TrainOptions, data: TrainData) -> None:
    """Refuse ``--early-stop`` on a run without held-out captions (nothing would ever improve)."""
    if opts.early_stop and len(data.val) == 0:
        why = (
            "the held-out split is empty"
            if opts.val_fraction or opts.val_data
            else f"no held-out split (the automatic one needs a store of {AUTO_VAL_MIN_IMAGES}+ images)"
        )
        raise UsageError(
            f"--early-stop needs a validation split, and this run has {why}: add --val-fraction or --val-data"
        )


def add_step_loss(pos: Position, loss: float) -> None:
    """Count a step's loss towards its epoch's mean (for the "loss not moving" warning)."""
    pos.epoch_loss_sum += loss
    pos.epoch_loss_steps += 1


def close_epoch(pos: Position, val_loss: float | None) -> bool:
    """Record the finished epoch's mean training loss and its held-out loss; True when the held-out
    loss is the best so far (then ``best.safetensors`` is due). Runs on every rank with the same numbers."""
    if pos.epoch_loss_steps:
        pos.epoch_losses.append(pos.epoch_loss_sum / pos.epoch_loss_steps)
    pos.epoch_loss_sum, pos.epoch_loss_steps = 0.0, 0
    if val_loss is None or not math.isfinite(val_loss):
        return False
    if pos.best_val_loss is None or val_loss < pos.best_val_loss:
        pos.best_val_loss, pos.best_epoch, pos.stale_epochs = val_loss, pos.epoch, 0
        return True
    pos.stale_epochs += 1
    return False


def early_stopped(opts: TrainOptions, pos: Position) -> bool:
    """``--early-stop N``: the held-out loss has not improved for N epochs."""
    return bool(opts.early_stop) and pos.stale_epochs >= opts.early_stop


def collapse_warning(epoch: int, samples: Sequence[Sample]) -> str | None:
    """One line when every sample caption of the epoch is the same (the image no longer matters)."""
    if len(samples) < 2 or len({s.caption for s in samples}) > 1:
        return None
    return (
        f'epoch {epoch}: all {len(samples)} sample images got the same caption "{samples[0].caption}": '
        "the model ignores the image; train longer or try a lower --lr, a longer --warmup, --normalize-prefix, "
        "or check that the store's embeddings belong to its captions"
    )


def plateau_warning(epoch: int, epoch_losses: Sequence[float]) -> str | None:
    """One line when the mean training loss has not moved (within 1%) for 2 epochs: said once,
    at the epoch it starts (not again while it stays flat)."""

    def flat(losses: Sequence[float]) -> bool:
        if len(losses) < PLATEAU_EPOCHS + 1:
            return False
        last = losses[-(PLATEAU_EPOCHS + 1) :]
        return all(abs(b - a) <= PLATEAU_TOLERANCE * abs(a) for a, b in zip(last, last[1:]))

    if not flat(epoch_losses) or flat(epoch_losses[:-1]):
        return None
    shown = " -> ".join(f"{x:.4f}" for x in epoch_losses[-(PLATEAU_EPOCHS + 1) :])
    return (
        f"epoch {epoch}: the training loss has not moved for {PLATEAU_EPOCHS} epochs ({shown}): "
        "check --lr and --warmup (warm-up steps run at a tiny lr), or whether the captions can be learned at all"
    )


# --------------------------------------------------------------------------- rank 0's work


class Monitor:
    """Rank 0's part: the sample images (chosen once, seeded), their thumbnails, ``samples.jsonl``,
    ``best.safetensors`` and ``report.html``. Build it on every rank; only rank 0 does anything."""

    def __init__(self, t: Trainer):
        self.out = t.out
        self.active = t.dist.main
        self.history: list[dict[str, Any]] = []  # samples.jsonl, one dict per epoch
        self.report: Path | None = None
        self._chosen: tuple[torch.Tensor, list[dict], Path, str] | None = None  # embeddings, records, root, split
        self._tokenizer: Any = None
        self._thumbs: dict[str, str | None] = {}
        if self.active:
            self._start(t.pos)

    def _start(self, pos: Position) -> None:
        """A new run starts without old files; a resumed one keeps its samples up to where it resumes."""
        path = self.out / SAMPLES_FILE
        if pos.step == 0:
            for name in (SAMPLES_FILE, BEST_FILE, REPORT_FILE):
                (self.out / name).unlink(missing_ok=True)
            return
        self.history = [r for r in _read_jsonl(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= pos.epoch]
        if path.is_file():
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.history))

    def end_epoch(self, t: Trainer, cb: TrainCallback, improved: bool) -> None:
        """After validation (rank 0): best.safetensors, the samples and warnings, report.html."""
        if not self.active:
            return
        pos = t.pos
        if improved:
            best = state.save_epoch_checkpoint(
                t.model, self.out / BEST_FILE, pos.epoch, pos.step, t.opts, val_loss=pos.best_val_loss
            )
            cb.on_checkpoint(best, "best")
        warnings = []
        samples = self.caption_samples(t)
        if samples:
            cb.on_samples(pos.epoch, pos.step, samples)
            warnings.append(collapse_warning(pos.epoch, samples))
        warnings.append(plateau_warning(pos.epoch, pos.epoch_losses))
        warnings = [w for w in warnings if w]
        for message in warnings:
            cb.on_warning(message)
        if samples:
            record = {
                "epoch": pos.epoch,
                "step": pos.step,
                "split": samples[0].split,
                "train_loss": pos.epoch_losses[-1] if pos.epoch_losses else None,
                "val_loss": pos.val_loss,
                "samples": [s.to_dict() for s in samples],
                "warnings": warnings,
            }
            self.history.append(record)
            with open(self.out / SAMPLES_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        self.write_report(t)

    # ------------------------------------------------------------------ samples

    def caption_samples(self, t: Trainer) -> list[Sample]:
        """Greedy captions of the chosen images by the model as it is now."""
        if t.opts.samples == 0:
            return []
        embeddings, records, _, split = self._choose(t)
        if not records:
            return []
        from clipcap_cli.decoding import decode as decoding
        from clipcap_cli.weights import backbones

        if self._tokenizer is None:
            self._tokenizer = backbones.load_tokenizer(t.opts.model.gpt2)
        positions = max_positions(t.model.gpt.config) or 1024
        max_length = max(1, min(SAMPLE_MAX_LENGTH, positions - t.model.prefix_length + 1))
        t.model.eval()
        try:
            with t.autocast():
                found = decoding.decode(t.model, self._tokenizer, embeddings.to(t.dist.device), max_length=max_length)
        finally:
            t.model.train()
        return [
            Sample(str(r.get("image", "")), tuple(str(c) for c in r.get("captions", [])), d.text, split)
            for r, d in zip(records, found)
        ]

    def _choose(self, t: Trainer) -> tuple[torch.Tensor, list[dict], Path, str]:
        """The same images every epoch: ``samples`` of the held-out images (else of the training
        images), drawn once with the run's seed."""
        if self._chosen is None:
            data = t.data
            held_out = len(data.val) > 0
            ds = data.val if held_out else data.train
            embeddings, chosen = ds.pick_images(t.opts.samples, t.opts.seed)  # reads only their shards
            root = ds.store.meta.get("images_root")
            self._chosen = (embeddings, chosen, Path(root) if root else ds.store.path, "val" if held_out else "train")
        return self._chosen

    # ------------------------------------------------------------------ report

    def write_report(self, t: Trainer) -> None:
        from clipcap_cli.train import report

        metrics = _read_jsonl(self.out / METRICS_FILE)
        train = [(float(r["epoch"]), float(r["loss"])) for r in metrics if r.get("type") == "train"]
        val = [(float(r["epoch"]), float(r["val_loss"])) for r in metrics if r.get("type") == "val"]
        root = self._choose(t)[2] if t.opts.samples else self.out
        for record in self.history:
            for s in record["samples"]:
                if s["image"] not in self._thumbs:
                    self._thumbs[s["image"]] = _thumbnail(root, s["image"])
        pos = t.pos
        info = {
            "run": str(self.out),
            "epoch": pos.epoch,
            "epochs": t.opts.epochs,
            "step": pos.step,
            "best_epoch": pos.best_epoch,
            "best_val_loss": pos.best_val_loss,
            "best_file": BEST_FILE if pos.best_epoch else None,
            "stopped_early": early_stopped(t.opts, pos) and pos.epoch < t.opts.epochs,
        }
        page = report.render(info, train, val, self.history, self._thumbs)
        self.report = write_text_atomic(self.out / REPORT_FILE, page)


def _read_jsonl(path: Path) -> list[dict]:
    """The dict lines of a JSON Lines file; torn or foreign lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _thumbnail(root: Path, image: str) -> str | None:
    """A small JPEG data URI of ``root / image``; None when it cannot be read (the report draws a box)."""
    from clipcap_cli.cli.html import thumbnail_data_uri

    if not image or image.startswith(("http://", "https://")):
        return None
    path = Path(image) if Path(image).is_absolute() else root / image
    try:
        return thumbnail_data_uri(path, THUMB_SIZE) if path.is_file() else None
    except OSError:
        return None
