"""`clipcap extract --text`: CLIP text embeddings of a dataset's captions (CapDec text-only training)."""

from __future__ import annotations

import json
from pathlib import Path


def extract_text_command(
    dataset: Path,
    images: Path | None,
    out: Path,
    fmt: str,
    split: str | None,
    clip: str,
    pretrained: str | None,
    batch_size: int,
    device: str | None,
    overwrite: bool,
    json_: bool,
    quiet: bool,
) -> None:
    from clipcap_cli.cli.ui import item_progress, say, stderr, stdout
    from clipcap_cli.data import features, text_features

    records, source = text_features.read_caption_source(dataset, images, fmt, split)
    say(f"{source['dataset_format']} {dataset}: {sum(len(r['captions']) for r in records)} captions (images not read)")
    options = text_features.TextExtractOptions(
        clip_model=clip,
        clip_pretrained=None if clip.startswith("local-dir:") else pretrained,
        batch_size=batch_size,
        device=device,
    )
    if overwrite:
        features.clear_store(out)

    progress = item_progress("captions", quiet)
    task = progress.add_task("encoding captions", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.start()
        progress.update(task, completed=done, total=total)

    try:
        result = text_features.extract_text(records, out, options, source=source, on_progress=on_progress)
    finally:
        progress.stop()
    info = {
        "out": str(result.out),
        "modality": text_features.MODALITY,
        "noop": result.noop,
        "records": result.records,
        "captions": result.captions,
        "empty_skipped": result.empty,
    }
    if result.noop:
        stderr.print(f"{out} is already complete; nothing to do (use --overwrite to redo it)", highlight=False)
    if json_:
        print(json.dumps(info))
    elif not result.noop:
        stdout.print(f"wrote text features for {result.captions} captions to {result.out}", highlight=False)
    if result.empty:
        stderr.print(f"[yellow]warning:[/] skipped {result.empty} empty caption(s)", highlight=False)
