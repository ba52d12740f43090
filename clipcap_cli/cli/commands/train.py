"""`clipcap train`: the ClipCap recipe on a features store, resumable, multi-GPU through torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.cli.commands import train_data, train_lora
from clipcap_cli.cli.commands.options import (
    ClipPretrainedOption,
    DatasetFormatOption,
    Gpt2AliasOption,
    ImagesRootOption,
    RecursiveOption,
    SplitOption,
    deprecated_alias,
    lm_choice,
)
from clipcap_cli.cli.commands.train_display import Display
from clipcap_cli.config import ModelConfig
from clipcap_cli.data.features import ExtractOptions
from clipcap_cli.train import TrainOptions
from clipcap_cli.train.options import AUTO_VAL_FRACTION, AUTO_VAL_MIN_IMAGES

HELP = """Train a ClipCap model on your images and captions, or on a features store from [bold]clipcap extract[/].

DATA is a folder of images with sidecar captions (photo.jpg + photo.txt, one caption per line), a
CSV/JSON Lines manifest, a COCO or Karpathy file, webdataset shards (a .tar, a glob or shards-{000..009}.tar),
or several of these; their images are encoded with CLIP once into a cached store (keyed by the data and
the CLIP), so a second run or a resume does not encode again. DATA may also be one features store.

Writes RUN/epoch-NNN.safetensors (usable as [bold]clipcap caption --model[/] with no other flags),
RUN/best.safetensors (the lowest held-out loss), RUN/metrics.jsonl, RUN/samples.jsonl (captions of a few held-
out images at each epoch's end), RUN/report.html (loss curves and samples), RUN/config.json and RUN/resume.pt.
Ctrl-C saves the run; [bold]--resume[/] continues it with the same schedule and data order. Defaults are the
original ClipCap's (MLP, K=10, lr 2e-5, 5000 warm-up steps or a tenth of a shorter run, batch 40, 10 epochs).
Multi-GPU: launch with torchrun (one process per GPU) on a store.

Example: [bold]clipcap train photos/ --out runs/mine --epochs 5[/]
Example: [bold]clipcap train feats/coco-train --out runs/mlp[/]
Example: [bold]clipcap train feats/coco-train --out runs/lora --lora 8 --lr 1e-4[/]
Example: [bold]torchrun --nproc_per_node 4 -m clipcap_cli train feats/coco-train --out runs/tf --mapping transformer --only-prefix --prefix-length 40 --clip-length 40[/]
"""

DATA, MODEL, OPTIM, RUN, WATCH = "Data", "Model", "Optimisation", "Run", "Watching"
D, M = TrainOptions, ModelConfig  # the one home of the defaults (the model's are in config.py)
E = ExtractOptions  # the CLIP that encodes images


def command(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder for checkpoints, metrics and the resume state.", rich_help_panel=DATA
        ),
    ],
    sources: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="DATA...",
            help="Images with captions (folder, manifest, COCO/Karpathy file, webdataset shards), or one features store.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--data",
            "-d",
            help="DATA given as an option (repeatable). Optional with --resume.",
            rich_help_panel=DATA,
        ),
    ] = None,
    val_data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--val-data",
            help="Separate validation data (images with captions, or a features store) instead of --val-fraction.",
            rich_help_panel=DATA,
        ),
    ] = None,
    images: ImagesRootOption = None,
    dataset_format: DatasetFormatOption = "auto",
    split: SplitOption = None,
    recursive: RecursiveOption = False,
    features_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--features",
            metavar="DIR",
            help="Where the stores extracted from DATA are cached (default: clipcap's data directory).",
            rich_help_panel=DATA,
        ),
    ] = None,
    clip: Annotated[
        Optional[str],
        typer.Option(
            "--clip",
            help=f"CLIP that encodes DATA's images (open_clip name or local-dir:PATH) \\[default: {E.clip_model}].",
            rich_help_panel=MODEL,
            show_default=False,
        ),
    ] = None,
    clip_pretrained: ClipPretrainedOption = None,
    val_fraction: Annotated[
        Optional[float],
        typer.Option(
            "--val-fraction",
            help="Share of the images held out for validation (instead of --val-data); 0 = none. Default: "
            f"{AUTO_VAL_FRACTION:g} of the images (at least 1) when the store has {AUTO_VAL_MIN_IMAGES}+ images, else none.",
            show_default=False,
            rich_help_panel=DATA,
        ),
    ] = D.val_fraction,
    max_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-tokens",
            help="Truncate captions to this many tokens (default: the LM's context window minus the prefix).",
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
            help="Freeze the LM and train only the mapper (the released transformer model's recipe).",
            rich_help_panel=MODEL,
        ),
    ] = M.only_prefix,
    lora: train_lora.LoraOption = D.lora,
    lora_alpha: train_lora.LoraAlphaOption = D.lora_alpha,
    lora_dropout: train_lora.LoraDropoutOption = D.lora_dropout,
    lora_targets: train_lora.LoraTargetsOption = None,
    prefix_length: Annotated[
        int,
        typer.Option("--prefix-length", help="K: LM input embeddings made from each image.", rich_help_panel=MODEL),
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
    from_text: Annotated[
        bool,
        typer.Option(
            "--from-text",
            help="Text-only training (CapDec): DATA's captions (.txt lines, manifests, COCO...; no image is read) are"
            " encoded by CLIP's text tower and trained on with noise; the model then captions images.",
            rich_help_panel=MODEL,
        ),
    ] = False,
    noise_variance: Annotated[
        Optional[float],
        typer.Option(
            "--noise-variance",
            help="CapDec: Gaussian noise variance added to the normalised CLIP embedding in training only"
            " (forces --normalize-prefix) \\[default: 0.016 on a text store (extract --text), else 0].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = D.noise_variance,
    lm: Annotated[
        str,
        typer.Option(
            "--lm",
            help="Causal language model to start from: hub name or local folder (weights and tokenizer): GPT-2,"
            " OPT, Llama, Qwen2, ... The mapper's width is its hidden size.",
            rich_help_panel=MODEL,
        ),
    ] = M.lm,
    gpt2: Gpt2AliasOption = None,
    stop_token: Annotated[
        str,
        typer.Option(
            "--stop-token",
            help='The token captions end with, recorded for captioning: "." as the original (captions are'
            " trained as written), or eos: the tokenizer's end of text, appended to every caption.",
            rich_help_panel=MODEL,
        ),
    ] = M.stop_token,
    epochs: Annotated[
        int, typer.Option("--epochs", "-e", help="Passes over the training captions.", rich_help_panel=OPTIM)
    ] = D.epochs,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Captions per batch, per process.", rich_help_panel=OPTIM)
    ] = D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=OPTIM)] = D.lr,
    warmup: Annotated[
        Optional[int],
        typer.Option(
            "--warmup",
            help="Linear warm-up steps; then linear decay to 0 \\[default: 5000 (the original's), or a tenth of the"
            " run's steps when that is fewer].",
            show_default=False,
            rich_help_panel=OPTIM,
        ),
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
            help="auto (bf16 autocast on CUDA, fp16 without bf16; fp32 elsewhere), fp32, bf16 or fp16. "
            "bf16 on a CPU without native bf16 (AVX512-BF16/AMX; see clipcap info) trains in fp32, with a warning.",
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
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            help="Held-out images captioned (greedy) at each epoch's end, shown and kept in samples.jsonl; 0 = none.",
            rich_help_panel=WATCH,
        ),
    ] = D.samples,
    early_stop: Annotated[
        int,
        typer.Option(
            "--early-stop",
            help="Stop when the held-out loss has not improved for N epochs (needs a validation split); 0 = never.",
            rich_help_panel=WATCH,
        ),
    ] = D.early_stop,
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
    from clipcap_cli.cli.ui import cli_errors, stderr

    with cli_errors():
        from clipcap_cli import train as core
        from clipcap_cli.errors import UsageError

        values: dict[str, Any] = {
            "mapping": mapping,
            "only_prefix": only_prefix,
            **train_lora.values(lora, lora_alpha, lora_dropout, lora_targets),
            "prefix_length": prefix_length,
            "clip_length": clip_length,
            "num_layers": num_layers,
            "normalize_prefix": normalize_prefix,
            "gpt2": lm_choice(lm, gpt2, M.lm),
            "stop_token": stop_token,
            "noise_variance": noise_variance,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "grad_accum": grad_accum,
            "seed": seed,
            "val_fraction": val_fraction,
            "val_data": None,
            "max_tokens": max_tokens,
            "num_workers": deprecated_alias("--num-workers", "--workers", num_workers, workers, D.num_workers),
            "buffer_shards": buffer_shards,
            "save_every": save_every,
            "checkpoint_every": checkpoint_every,
            "log_every": log_every,
            "device": device,
            "precision": precision,
            "samples": samples,
            "early_stop": early_stop,
        }
        given = list(sources or []) + list(data or [])
        if not resume:
            from clipcap_cli.train.state import check_out_dir

            check_out_dir(out, resume)  # before encoding: a run that cannot start should say so at once
        if resume:
            # The run's own options, with only what was typed on this command line changed (the core
            # refuses changes that would alter the trajectory).
            saved, saved_data = core.read_run(out)
            params = {"num_workers": ("workers", "num_workers")}  # the option's parameters, old spelling included
            typed = {k: v for k, v in values.items() if any(_typed(ctx, n) for n in params.get(k, (k,)))}
            opts = saved.replace(**typed)
        else:
            if not given:
                raise UsageError(
                    "give DATA: images with captions (e.g. a folder of photo.jpg + photo.txt) or a features store"
                )
            opts = TrainOptions.create(**values)
        clip_opts = ExtractOptions(
            clip_model=clip or E.clip_model,
            clip_pretrained=_clip_tag(clip, clip_pretrained),
            device=device,
            shard=(0, 1),
        )
        reading = {"images": images, "fmt": dataset_format, "split": split, "recursive": recursive}
        store = (
            train_data.store(given, clip_opts, reading, features_dir, out, "training", quiet, from_text)
            if given
            else saved_data  # type: ignore[possibly-undefined]
        )
        if clip is not None or clip_pretrained is not None:  # a store made with another tower is refused
            from clipcap_cli.data.store_format import check_store_tower

            check_store_tower(store, clip_opts.clip_model, clip_opts.clip_pretrained)
        if val_data:
            if _typed(ctx, "val_fraction") and (val_fraction or 0) > 0:
                raise UsageError("give either --val-fraction or --val-data, not both")
            vstore = train_data.store(val_data, clip_opts, reading, features_dir, out, "validation", quiet, from_text)
            opts = opts.replace(val_data=str(vstore), val_fraction=0.0)

        from clipcap_cli import distributed

        rank = distributed.env().rank
        display = Display(quiet=quiet or rank != 0)
        try:
            with display:
                result = core.train(opts, store, out, resume=resume, callback=display)
        except core.TrainingInterrupted as exc:
            if rank == 0:
                stderr.print(f"[yellow]{exc}[/]", highlight=False)
                stderr.print(f"continue with: [bold]clipcap train --out {exc.out_dir} --resume[/]", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        if rank == 0 and result.checkpoints:
            print(result.checkpoints[-1])


def _clip_tag(clip: str | None, tag: str | None) -> str | None:
    if clip and clip.startswith("local-dir:"):
        return None
    if tag is None and (not clip or clip == E.clip_model):
        return E.clip_pretrained
    if tag is None:  # the tag --clip names by default (openai, else its only one), as extract's
        from clipcap_cli.weights.clip_tower import default_clip_tag

        return default_clip_tag(clip)
    return None if tag.strip().lower() in ("", "none") else tag


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (rather than it taking its default)."""
    source = ctx.get_parameter_source(name)
    # By name: Typer may use its own vendored copy of click's ParameterSource enum.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
