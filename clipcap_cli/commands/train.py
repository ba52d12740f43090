"""`clipcap train`: the ClipCap recipe on a features store, resumable, multi-GPU through torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.commands.options import deprecated_alias
from clipcap_cli.config import ModelConfig
from clipcap_cli.train import StartInfo, StepInfo, TrainCallback, TrainOptions

HELP = """Train a ClipCap model on CLIP features made by [bold]clipcap extract[/].

Writes RUN/epoch-NNN.safetensors (usable as [bold]clipcap caption --model[/] with no other flags),
RUN/metrics.jsonl, RUN/config.json and RUN/resume.pt. Ctrl-C saves the run; [bold]--resume[/] continues
it with the same schedule and data order. Defaults are the original ClipCap's (MLP, K=10, lr 2e-5,
5000 warm-up steps, batch 40, 10 epochs). Multi-GPU: launch with torchrun (one process per GPU).

Example: [bold]clipcap train --data feats/coco-train --out runs/mlp[/]
Example: [bold]torchrun --nproc_per_node 4 -m clipcap_cli train --data feats/coco-train --out runs/tf --mapping transformer --only-prefix --prefix-length 40 --clip-length 40[/]
"""

DATA, MODEL, OPTIM, RUN = "Data", "Model", "Optimisation", "Run"
D, M = TrainOptions, ModelConfig  # the one home of the defaults (the model's are in config.py)


def command(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder for checkpoints, metrics and the resume state.", rich_help_panel=DATA
        ),
    ],
    data: Annotated[
        Optional[Path],
        typer.Option(
            "--data",
            "-d",
            help="Features store from `clipcap extract` (a folder). Optional with --resume.",
            rich_help_panel=DATA,
        ),
    ] = None,
    val_data: Annotated[
        Optional[Path],
        typer.Option(
            "--val-data", help="A separate features store to compute the validation loss on.", rich_help_panel=DATA
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Share of the images held out for validation (instead of --val-data).",
            rich_help_panel=DATA,
        ),
    ] = D.val_fraction,
    max_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-tokens",
            help="Truncate captions to this many tokens (default: GPT-2's window minus the prefix).",
            rich_help_panel=DATA,
        ),
    ] = D.max_tokens,
    workers: Annotated[
        int, typer.Option("--workers", "-j", help="DataLoader worker processes.", rich_help_panel=DATA)
    ] = D.num_workers,
    num_workers: Annotated[
        Optional[int], typer.Option("--num-workers", hidden=True, help="Old spelling of --workers.")
    ] = None,  # before 0.3: --workers
    buffer_shards: Annotated[
        int,
        typer.Option(
            "--buffer-shards",
            help="Shards of a sharded store shuffled together, and held in memory, at a time.",
            rich_help_panel=DATA,
        ),
    ] = D.buffer_shards,
    mapping: Annotated[
        str, typer.Option("--mapping", help="Mapper: mlp or transformer.", rich_help_panel=MODEL)
    ] = M.mapping,
    only_prefix: Annotated[
        bool,
        typer.Option(
            "--only-prefix",
            help="Freeze GPT-2 and train only the mapper (the released transformer model's recipe).",
            rich_help_panel=MODEL,
        ),
    ] = M.only_prefix,
    prefix_length: Annotated[
        int,
        typer.Option("--prefix-length", help="K: GPT-2 input embeddings made from each image.", rich_help_panel=MODEL),
    ] = M.prefix_length,
    clip_length: Annotated[
        int,
        typer.Option(
            "--clip-length",
            help="Transformer mapper: tokens the CLIP embedding is projected to.",
            rich_help_panel=MODEL,
        ),
    ] = M.clip_length,
    num_layers: Annotated[
        int, typer.Option("--num-layers", help="Transformer mapper: number of layers.", rich_help_panel=MODEL)
    ] = M.num_layers,
    normalize_prefix: Annotated[
        bool,
        typer.Option(
            "--normalize-prefix",
            help="L2-normalise CLIP embeddings before the mapper (stored in the checkpoint).",
            rich_help_panel=MODEL,
        ),
    ] = M.normalize_prefix,
    gpt2: Annotated[
        str,
        typer.Option(
            "--gpt2",
            help="GPT-2 to start from: hub name or local folder (weights and tokenizer).",
            rich_help_panel=MODEL,
        ),
    ] = M.gpt2,
    epochs: Annotated[
        int, typer.Option("--epochs", "-e", help="Passes over the training captions.", rich_help_panel=OPTIM)
    ] = D.epochs,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Captions per batch, per process.", rich_help_panel=OPTIM)
    ] = D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=OPTIM)] = D.lr,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Linear warm-up steps; then linear decay to 0.", rich_help_panel=OPTIM)
    ] = D.warmup,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (the original: 0).", rich_help_panel=OPTIM)
    ] = D.weight_decay,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Batches accumulated per optimizer step.", rich_help_panel=OPTIM)
    ] = D.grad_accum,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed for the mapper init, data order, dropout and validation split.", rich_help_panel=OPTIM
        ),
    ] = D.seed,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (bf16 autocast on CUDA, fp16 without bf16; fp32 elsewhere), fp32, bf16 or fp16.",
            rich_help_panel=OPTIM,
        ),
    ] = D.precision,
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every", help="Write a checkpoint every N epochs (and after the last).", rich_help_panel=RUN
        ),
    ] = D.save_every,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every",
            help="Save the resume state every N optimizer steps (and at each epoch end).",
            rich_help_panel=RUN,
        ),
    ] = D.checkpoint_every,
    log_every: Annotated[
        int, typer.Option("--log-every", help="Write a metrics.jsonl line every N steps.", rich_help_panel=RUN)
    ] = D.log_every,
    device: Annotated[
        Optional[str],
        typer.Option(
            "--device",
            help="cpu, cuda, cuda:N or mps (default: best available; torchrun: cuda:LOCAL_RANK).",
            rich_help_panel=RUN,
        ),
    ] = D.device,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its resume.pt (options default to the run's own).",
            rich_help_panel=RUN,
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bar; print only the final checkpoint path.", rich_help_panel=RUN
        ),
    ] = False,
) -> None:
    """Train a ClipCap model on a features store."""
    from clipcap_cli.ui import cli_errors, stderr

    with cli_errors():
        from clipcap_cli import train as core
        from clipcap_cli.errors import UsageError

        values: dict[str, Any] = {
            "mapping": mapping,
            "only_prefix": only_prefix,
            "prefix_length": prefix_length,
            "clip_length": clip_length,
            "num_layers": num_layers,
            "normalize_prefix": normalize_prefix,
            "gpt2": gpt2,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "grad_accum": grad_accum,
            "seed": seed,
            "val_fraction": val_fraction,
            "val_data": str(val_data) if val_data else None,
            "max_tokens": max_tokens,
            "num_workers": deprecated_alias("--num-workers", "--workers", num_workers, workers, D.num_workers),
            "buffer_shards": buffer_shards,
            "save_every": save_every,
            "checkpoint_every": checkpoint_every,
            "log_every": log_every,
            "device": device,
            "precision": precision,
        }
        if resume:
            # The run's own options, with only what was typed on this command line changed (the core
            # refuses changes that would alter the trajectory).
            saved, saved_data = core.read_run(out)
            params = {"num_workers": ("workers", "num_workers")}  # the option's parameters, old spelling included
            typed = {k: v for k, v in values.items() if any(_typed(ctx, n) for n in params.get(k, (k,)))}
            opts = saved.replace(**typed)
            data = data or saved_data
        else:
            if data is None:
                raise UsageError("--data is required (the features folder from `clipcap extract`)")
            opts = TrainOptions.create(**values)

        from clipcap_cli import distributed

        rank = distributed.env().rank
        display = _Display(quiet=quiet or rank != 0)
        try:
            with display:
                result = core.train(opts, data, out, resume=resume, callback=display)
        except core.TrainingInterrupted as exc:
            if rank == 0:
                stderr.print(f"[yellow]{exc}[/]", highlight=False)
                stderr.print(f"continue with: [bold]clipcap train --out {exc.out_dir} --resume[/]", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        if rank == 0 and result.checkpoints:
            print(result.checkpoints[-1])


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (rather than it taking its default)."""
    source = ctx.get_parameter_source(name)
    # By name: Typer may use its own vendored copy of click's ParameterSource enum.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


class _Display(TrainCallback):
    """The core's TrainCallback, drawn with rich on stderr: a bar with epoch, loss, lr, samples/s, ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None
        self.tok_task: Any = None
        self.samples_per_s: float | None = None

    def __enter__(self) -> _Display:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from clipcap_cli.ui import stderr

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
        from clipcap_cli.ui import say

        if self.tok_task is not None:
            self.progress.remove_task(self.tok_task)
        if info.start_step >= info.total_steps:
            self._print(f"{info.out_dir} is complete ({info.total_steps} steps): nothing left to train")
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
        stats = f"loss {info.loss_ema:.3f} lr {info.lr:.1e} {self.samples_per_s:,.0f}/s"
        self.progress.update(
            self.task, completed=info.step, description=f"epoch {info.epoch}/{info.epochs}", stats=stats
        )

    def on_validation(self, epoch: int, step: int, loss: float) -> None:
        self._print(f"epoch {epoch}: validation loss {loss:.4f} (step {step})")

    def on_checkpoint(self, path: Path, kind: str) -> None:
        from clipcap_cli.ui import say

        if kind == "epoch":
            self._print(f"saved {path}")
        else:
            say(f"saved resume state {path}")

    def on_warning(self, message: str) -> None:
        from clipcap_cli.ui import warn

        if not self.quiet:
            warn(message)

    def _print(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, highlight=False)
