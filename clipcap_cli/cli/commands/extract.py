"""`clipcap extract`: CLIP features for a captioned dataset (or a folder), batched, resumable, shardable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli import distributed
from clipcap_cli.cli.commands.options import (
    DatasetFormatOption,
    DeviceOption,
    ImagesRootOption,
    ImageWorkersOption,
    JsonOption,
    QuietOption,
    RecursiveOption,
    SplitOption,
    deprecated_alias,
)
from clipcap_cli.data.features import ExtractOptions

HELP = """Encode a dataset's images with CLIP once per image and write a features store for `train` and `eval`.

DATASET is a COCO captions file, a Karpathy split file (dataset_coco.json), the original ClipCap
train_caption.json, a CSV/TSV/JSON Lines manifest (image or path column, caption), a folder of images
(captions from sidecar files: photo.jpg + photo.txt), or webdataset shards (a .tar, a glob, or a brace
range such as 'shards/{000..009}.tar'; KEY.jpg with KEY.txt or a caption in KEY.json).
Interrupted runs continue where they stopped when the same command is run again.
Unreadable images are listed in OUT/skipped.jsonl (exit code 3).

Example: [bold]clipcap extract annotations/captions_train2014.json --images coco/ --out feats/coco-vitb32[/]

Sharded: [bold]clipcap extract data.csv --out feats --shard 0/2[/] and [bold]--shard 1/2[/], then [bold]clipcap extract --merge feats[/]

Text only (CapDec): [bold]clipcap extract captions.txt --text --out feats/text[/], then [bold]clipcap train --data feats/text[/]
"""

D = ExtractOptions()
DATA = "Dataset"
MODEL = "Model and speed"
RUN = "Output and resuming"
ORIGINAL = "Original ClipCap pickles"
SHOW_SKIPPED = 5


def command(
    dataset: Annotated[
        Optional[Path],
        typer.Argument(
            help="Dataset file, image folder or webdataset shards (with --text: also a .txt file of captions).",
            show_default=False,
        ),
    ] = None,
    images: ImagesRootOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Features directory to write.", rich_help_panel=RUN)
    ] = None,
    dataset_format: DatasetFormatOption = "auto",
    format_: Annotated[
        Optional[str], typer.Option("--format", hidden=True, help="Old spelling of --dataset-format.")
    ] = None,  # before 0.3: --dataset-format
    split: SplitOption = None,
    recursive: RecursiveOption = False,
    text: Annotated[
        bool,
        typer.Option(
            "--text",
            help="Encode the captions with CLIP's text tower instead (CapDec text-only training): one row per"
            " caption; images need not exist. DATASET may also be a .txt file, one caption per line.",
            rich_help_panel=DATA,
        ),
    ] = False,
    clip: Annotated[
        Optional[str],
        typer.Option(
            help=f"open_clip model name, or local-dir:PATH \\[default: {D.clip_model}].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    clip_pretrained: Annotated[
        Optional[str],
        typer.Option(
            "--clip-pretrained",
            help="open_clip pretrained tag; 'none' = random weights \\[default: openai where --clip has it, else its only tag,"
            " e.g. webli for SigLIP].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    pretrained: Annotated[
        Optional[str], typer.Option("--pretrained", hidden=True, help="Old spelling of --clip-pretrained.")
    ] = None,  # before 0.3: --clip-pretrained
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", help="Images (with --text: captions) per CLIP forward pass.", rich_help_panel=MODEL
        ),
    ] = D.batch_size,
    workers: ImageWorkersOption = D.workers,
    device: DeviceOption = D.device,
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="i/n: encode only this process's share (default from torchrun's RANK/WORLD_SIZE).", rich_help_panel=RUN
        ),
    ] = None,
    merge: Annotated[
        Optional[Path],
        typer.Option(
            help="Join the part files of a sharded run in this directory into the final store.", rich_help_panel=RUN
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over, discarding what OUT holds.", rich_help_panel=RUN)
    ] = False,
    export_pickle: Annotated[
        Optional[Path],
        typer.Option(
            "--export-pickle",
            metavar="FILE",
            help="Also write the original ClipCap pickle (one row per caption).",
            rich_help_panel=ORIGINAL,
        ),
    ] = None,
    import_pickle: Annotated[
        Optional[Path],
        typer.Option(
            "--import-pickle",
            metavar="FILE",
            help="Convert an original ClipCap pickle into a store at --out (safely, no code runs).",
            rich_help_panel=ORIGINAL,
        ),
    ] = None,
    shard_size: Annotated[
        Optional[int],
        typer.Option(
            "--shard-size",
            metavar="N",
            help="Write a sharded store of N images per shard, which `clipcap train` streams (for stores larger than memory).",
            rich_help_panel=RUN,
        ),
    ] = D.shard_size,
    chunk_size: Annotated[int, typer.Option("--chunk-size", hidden=True, help="Images per part file.")] = D.chunk_size,
    json_: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    from clipcap_cli.cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.errors import UsageError

        pretrained = deprecated_alias("--pretrained", "--clip-pretrained", pretrained, clip_pretrained, None)
        format_ = deprecated_alias("--format", "--dataset-format", format_, dataset_format, "auto")
        if sum(x is not None for x in (merge, import_pickle)) + (dataset is not None) != 1:
            raise UsageError("give one of: a DATASET, --merge DIR, or --import-pickle FILE")
        if text and dataset is None:
            raise UsageError("--text encodes the captions of a DATASET: --merge and --import-pickle do not apply")
        if import_pickle is not None:
            _import(import_pickle, out, images, clip, pretrained, export_pickle, json_)
            return
        if merge is not None:
            if out is not None and out.resolve() != merge.resolve():
                raise UsageError("--merge DIR merges in place: leave out --out")
            _merge(merge, export_pickle, json_)
            return
        if out is None:
            raise UsageError("--out DIR is required")
        if text:
            if shard or export_pickle:
                raise UsageError("--text stores are written in one go: --shard and --export-pickle do not apply")
            from clipcap_cli.cli.commands.extract_text import extract_text_command

            pretrained = _default_tag(clip) if pretrained is None else _tag(pretrained)
            clip = clip or D.clip_model
            extract_text_command(
                dataset, images, out, format_, split, clip, pretrained, batch_size, device, overwrite, json_, quiet
            )
            return
        from clipcap_cli.fsutil import check_folder, refuse_inputs

        check_folder(out)
        refuse_inputs(export_pickle, [dataset], "--export-pickle")
        pretrained = _default_tag(clip) if pretrained is None else _tag(pretrained)
        clip = clip or D.clip_model
        options = ExtractOptions(
            clip_model=clip,
            clip_pretrained=None if clip.startswith("local-dir:") else pretrained,
            batch_size=batch_size,
            workers=workers,
            device=device or distributed.local_device(),
            chunk_size=chunk_size,
            shard=_parse_shard(shard),
            shard_size=shard_size,
        )
        _extract(dataset, images, out, format_, split, recursive, options, overwrite, export_pickle, json_, quiet)


def _default_tag(clip: str | None) -> str | None:
    """The pretrained tag when none is typed: the default CLIP's, or the one ``--clip`` names by default."""
    if clip is None:
        return D.clip_pretrained
    from clipcap_cli.weights.clip_tower import default_clip_tag

    return default_clip_tag(clip)


def _tag(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text


def _parse_shard(text: str | None) -> tuple[int, int]:
    from clipcap_cli.batch.shards import parse_shard

    if text:
        return parse_shard(text)
    place = distributed.env()
    return (place.rank, place.world_size)


def _check_images_exist(records: list[dict], root: Path) -> None:
    """Fail at once when --images is wrong, instead of skipping every image one by one."""
    from clipcap_cli.errors import UsageError

    probe = records[:50]
    if probe and not any((root / r["image"]).is_file() for r in probe):
        raise UsageError(
            f"none of the first {len(probe)} images exist (e.g. {root / probe[0]['image']}): check --images"
        )


def _extract(
    dataset: Path,
    images: Path | None,
    out: Path,
    fmt: str,
    split: str | None,
    recursive: bool,
    options: ExtractOptions,
    overwrite: bool,
    export_pickle: Path | None,
    json_: bool,
    quiet: bool,
) -> None:
    from clipcap_cli.cli.ui import item_progress, say, stderr
    from clipcap_cli.data import features
    from clipcap_cli.data.datasets import read_dataset

    ds = read_dataset(dataset, images, fmt, split, recursive)
    records = list(ds.records())
    say(
        f"{ds.format} dataset {ds.source}: {len(records)} images, {sum(len(r['captions']) for r in records)} captions; images under {ds.images_root}"
    )
    if ds.format not in ("folder", "webdataset"):
        _check_images_exist(records, ds.images_root)
    if ds.unpaired and any(r["captions"] for r in records):
        what = ", ".join(f"{n} {name}" for name, n in ds.unpaired.counts().items() if n)
        from clipcap_cli.cli.ui import warn

        warn(f"{ds.source}: {what}")
    if overwrite:
        features.clear_store(out)

    progress = item_progress("images", quiet)
    task = progress.add_task("extracting", total=None)
    started = False

    def on_progress(done: int, total: int) -> None:
        nonlocal started
        if not started:  # only now: a finished store (no-op) shows no bar at all
            if done:
                stderr.print(
                    f"resuming: {done} of {total} images already done in {out / features.PARTS_DIR}", highlight=False
                )
            progress.start()
            progress.reset(task, total=total, completed=done, base=done)  # the rate counts this run's images only
            started = True
        progress.update(task, completed=done, total=total)

    try:
        result = features.extract(records, ds.images_root, out, options, source=ds.describe(), on_progress=on_progress)
    except KeyboardInterrupt:
        progress.stop()
        stderr.print(
            f"[red]interrupted[/]: finished chunks are kept in {out / features.PARTS_DIR}; run the same command again to continue"
        )
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    if result.noop:
        stderr.print(f"{out} is already complete; nothing to do (use --overwrite to redo it)", highlight=False)
        if export_pickle:
            _export(out, export_pickle)
        _summary(result, json_, show_skipped=False)
        return
    if not result.complete:
        i, n = options.shard
        left = (
            f"{result.chunks_missing} chunks are still missing from other shards"
            if result.chunks_missing
            else "every chunk is done"
        )
        stderr.print(
            f"shard {i}/{n} done: {result.encoded} images encoded; {left}. When every shard has finished: "
            f"[bold]clipcap extract --merge {out}[/]",
            highlight=False,
        )
        if export_pickle:
            stderr.print(
                "[yellow]warning:[/] --export-pickle needs the merged store: pass it to the --merge run",
                highlight=False,
            )
        _summary(result, json_, show_skipped=True)
        return
    if export_pickle:
        _export(out, export_pickle)
    _summary(result, json_, show_skipped=True)


def _merge(folder: Path, export_pickle: Path | None, json_: bool) -> None:
    from clipcap_cli.cli.ui import stderr
    from clipcap_cli.data import features

    result = features.merge_parts(folder)
    if result.noop:
        stderr.print(f"{folder} is already merged; nothing to do", highlight=False)
    if export_pickle:
        _export(folder, export_pickle)
    _summary(result, json_, show_skipped=not result.noop)


def _export(out: Path, target: Path) -> None:
    from clipcap_cli.cli.ui import stderr
    from clipcap_cli.data.features import load_features
    from clipcap_cli.data.legacy import export_original_pickle

    fs = load_features(out)
    export_original_pickle(fs, target)
    stderr.print(f"wrote the original-format pickle {target} ({fs.num_captions} caption rows)", highlight=False)


def _import(
    pickle_file: Path,
    out: Path | None,
    images: Path | None,
    clip: str | None,
    pretrained: str | None,
    export_pickle: Path | None,
    json_: bool,
) -> None:
    from clipcap_cli.cli.ui import stdout, warn
    from clipcap_cli.data.legacy import import_original_pickle
    from clipcap_cli.errors import UsageError

    if out is None:
        raise UsageError("--import-pickle needs --out DIR")
    if export_pickle:
        raise UsageError("--import-pickle and --export-pickle do not go together")
    fs, warnings = import_original_pickle(
        pickle_file, out, images, clip, _tag(pretrained) if pretrained is not None else None
    )
    for w in warnings:
        warn(w)
    if fs.meta.get("clip_model_guessed"):
        warn(
            f"the pickle does not say which CLIP made it; recorded {fs.meta['clip_model']} ({fs.meta['clip_pretrained']}) from its width: pass --clip to set it"
        )
    info = {
        "out": str(fs.path),
        "images": len(fs),
        "captions": fs.num_captions,
        "pickle_rows": fs.meta["counts"]["pickle_rows"],
    }
    if json_:
        print(json.dumps(info))
    else:
        stdout.print(
            f"imported {info['pickle_rows']} rows as {info['images']} images ({info['captions']} captions) into {fs.path}",
            highlight=False,
        )


def _summary(result: Any, json_: bool, show_skipped: bool) -> None:
    from clipcap_cli.cli.ui import stderr, stdout
    from clipcap_cli.data.features import SKIPPED_FILE
    from clipcap_cli.errors import EXIT_PARTIAL

    info = {
        "out": str(result.out),
        "complete": result.complete,
        "noop": result.noop,
        "records": result.records,
        "encoded": result.encoded,
        "reused": result.reused,
        "skipped": len(result.skipped),
    }
    if json_:
        print(json.dumps(info))
    elif result.complete and not result.noop:
        stdout.print(
            f"wrote features for {result.records - len(result.skipped)} images to {result.out}"
            + (f" ({result.reused} from an earlier run)" if result.reused else ""),
            highlight=False,
        )
    if show_skipped and result.skipped:
        where = result.out / SKIPPED_FILE if result.complete else "the part files"
        stderr.print(
            f"[yellow]warning:[/] skipped {len(result.skipped)} unreadable images (listed in {where}):", highlight=False
        )
        for s in result.skipped[:SHOW_SKIPPED]:
            stderr.print(f"  {s['image']}: {s['reason']}", highlight=False, markup=False)
        if len(result.skipped) > SHOW_SKIPPED:
            stderr.print(f"  ... and {len(result.skipped) - SHOW_SKIPPED} more", highlight=False)
        raise typer.Exit(EXIT_PARTIAL)
