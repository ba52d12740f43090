"""What `clipcap train` shows on stderr: the core's TrainCallback hooks drawn with rich (progress bar,
validation lines, each epoch's samples table, where the best checkpoint and the report are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clipcap_cli.train import Sample, StartInfo, StepInfo, TrainCallback, TrainResult


class Display(TrainCallback):
    """The core's TrainCallback, drawn with rich on stderr: a bar with epoch, loss, lr, samples/s, ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None
        self.tok_task: Any = None
        self.samples_per_s: float | None = None

    def __enter__(self) -> Display:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from clipcap_cli.cli.ui import stderr

        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stderr,
            disable=self.quiet,
        )
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    # the TrainCallback hooks
    def on_tokenize(self, done: int, total: int) -> None:
        if self.tok_task is None:
            self.tok_task = self.progress.add_task("tokenising captions", total=total, stats="")
        self.progress.update(self.tok_task, completed=done)

    def on_start(self, info: StartInfo) -> None:
        from clipcap_cli.cli.ui import say

        if self.tok_task is not None:
            self.progress.remove_task(self.tok_task)
        if info.start_step >= info.total_steps:
            self._print(f"{info.out_dir} is complete ({info.total_steps} steps): nothing left to train")
            return
        if info.stopped_early:
            self._print(
                f"{info.out_dir} was stopped by --early-stop: nothing left to train (raise --early-stop to go on)"
            )
            return
        what = f"resuming at step {info.start_step}" if info.start_step else "training"
        self._print(
            f"{what}: {info.train_samples} captions ({info.val_samples} for validation), {info.epochs} epoch(s) x "
            f"{info.steps_per_epoch} steps of {info.global_batch}, {info.trainable_params / 1e6:.1f}M trainable parameters, "
            f"{info.device}"
            + (f" x {info.world_size} processes" if info.world_size > 1 else "")
            + f", {info.precision}"
        )
        say(f"run folder {info.out_dir}; captions truncated to {info.max_tokens} tokens: {info.truncated}")
        self.task = self.progress.add_task("training", total=info.total_steps, completed=info.start_step, stats="")

    def on_step(self, info: StepInfo) -> None:
        if self.task is None:
            return
        sps = info.samples_per_s
        self.samples_per_s = sps if self.samples_per_s is None else 0.9 * self.samples_per_s + 0.1 * sps
        rate = self.samples_per_s
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # a slow CPU run is not "0/s"
        stats = f"loss {info.loss_ema:.3f} lr {info.lr:.1e} {shown} captions/s"
        self.progress.update(
            self.task, completed=info.step, description=f"epoch {info.epoch}/{info.epochs}", stats=stats
        )

    def on_validation(self, epoch: int, step: int, loss: float) -> None:
        self._print(f"epoch {epoch}: validation loss {loss:.4f} (step {step})")

    def on_checkpoint(self, path: Path, kind: str) -> None:
        from clipcap_cli.cli.ui import say

        if kind == "epoch":
            self._print(f"saved {path}")
        else:
            say(f"saved resume state {path}")

    def on_samples(self, epoch: int, step: int, samples: Sequence[Sample]) -> None:
        if self.quiet:
            return
        from rich.table import Table
        from rich.text import Text  # captions and paths are data, not rich markup

        held_out = samples[0].split == "val" if samples else True
        where = "held-out images" if held_out else "training images: the run has no held-out split"
        table = Table(title=f"epoch {epoch} samples ({where})", title_justify="left", show_lines=False)
        table.add_column("image", style="dim", overflow="fold", max_width=28)
        table.add_column("generated", style="bold", overflow="fold")
        table.add_column("reference", overflow="fold")
        for s in samples:
            table.add_row(
                Text(_short(s.image)),
                Text(_short(s.caption.strip())),
                Text(_short(s.references[0] if s.references else "")),
            )
        self.progress.console.print(table)

    def on_end(self, result: TrainResult, model: Any) -> None:
        if result.stopped_early:
            self._print(f"stopped early: the held-out loss has not improved since epoch {result.best_epoch}")
        if result.best is not None:
            self._print(f"best: {result.best} (epoch {result.best_epoch}, held-out loss {result.best_val_loss:.4f})")
        if result.report is not None:
            self._print(f"report: {result.report}")

    def on_warning(self, message: str) -> None:
        from clipcap_cli.cli.ui import warn

        if not self.quiet:
            warn(message)

    def _print(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, highlight=False)


SHOWN_CHARS = 100  # a sample cell on the terminal (samples.jsonl and report.html keep the whole text)


def _short(text: str) -> str:
    """An untrained model repeats a word up to the length limit: the table shows the start of it."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"
