"""`clipcap train`'s data: DATA... as the features store training reads (a store given as is, or the
captioned images, or with --from-text the captions, encoded with CLIP into a cached store), with the
terminal's progress and reports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from clipcap_cli.data.features import ExtractOptions


def store(
    given: list[str],
    clip_opts: ExtractOptions,
    reading: dict[str, Any],
    stores: Path | None,
    out: Path,
    role: str,
    quiet: bool,
    from_text: bool = False,
) -> Path:
    """The features store to train on: ``given`` itself when it is one store, else ``given``'s captioned
    images encoded with CLIP into a cached store (progress on stderr, what was unpaired reported)."""
    from clipcap_cli import distributed
    from clipcap_cli.cli.ui import item_progress, stderr, warn
    from clipcap_cli.data import collection
    from clipcap_cli.data.features import is_store
    from clipcap_cli.errors import UsageError

    stores_given = [g for g in given if is_store(Path(g).expanduser())]
    if stores_given:
        if len(given) > 1:
            raise UsageError(f"give one features store ({stores_given[0]}) or images with captions, not both")
        return Path(given[0]).expanduser()
    place = distributed.env()
    if stores is None:
        from clipcap_cli import paths

        paths.home()  # where the encoded store goes: an unusable data directory says so before any work
    if from_text:
        return _text_store(given, clip_opts, reading, stores, role, quiet or place.rank != 0, place)
    coll = collection.read_collection(given, **reading)
    n_unpaired = sum(coll.unpaired.counts().values())
    if n_unpaired and place.rank == 0:
        what = ", ".join(f"{n} {name}" for name, n in coll.unpaired.counts().items() if n)
        listed = out / f"unpaired-{role}.json"
        from clipcap_cli.fsutil import write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(listed, json.dumps(coll.unpaired.to_dict(), indent=1, ensure_ascii=False) + "\n")
        if not quiet:
            warn(f"{role} data: skipped {what} (listed in {listed})")
    if not quiet and place.rank == 0:
        stderr.print(f"{role} data: {len(coll.records)} captioned images, {coll.captions} captions", highlight=False)
    # Under torchrun every process encodes its share of the images, then the first joins them (collection.py).
    device = clip_opts.device or distributed.local_device()
    clip_opts = dataclasses.replace(clip_opts, shard=(place.rank, place.world_size), device=device)
    progress = item_progress("images", quiet or place.rank != 0)
    task = progress.add_task(f"encoding {role} images", total=None)
    started = False

    def on_progress(done: int, total: int) -> None:
        nonlocal started
        if not started:
            progress.start()
            progress.reset(task, total=total, completed=done, base=done)
            started = True
        progress.update(task, completed=done, total=total)

    try:
        result = collection.encode_collection(coll, clip_opts, stores=stores, on_progress=on_progress)
    except KeyboardInterrupt:
        progress.stop()
        stderr.print("[red]interrupted[/]: the images encoded so far are kept; run the same command to continue")
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    if result.noop and not quiet and place.rank == 0:
        stderr.print(f"{role} features: reusing {result.out} (encoded before)", highlight=False)
    elif result.skipped and not quiet:
        warn(f"{role} data: {len(result.skipped)} unreadable images skipped (listed in {result.out}/skipped.jsonl)")
    return result.out


def _text_store(
    given: list[str],
    clip_opts: ExtractOptions,
    reading: dict[str, Any],
    stores: Path | None,
    role: str,
    quiet: bool,
    place: Any,
) -> Path:
    """``--from-text``: DATA's captions as a cached CLIP text store (CapDec)."""
    from clipcap_cli.cli.ui import item_progress, stderr
    from clipcap_cli.data import collection
    from clipcap_cli.data.text_features import TextExtractOptions

    options = TextExtractOptions(
        clip_model=clip_opts.clip_model, clip_pretrained=clip_opts.clip_pretrained, device=clip_opts.device
    )
    progress = item_progress("captions", quiet)
    task = progress.add_task(f"encoding {role} captions", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.start()
        progress.update(task, completed=done, total=total)

    try:
        result = collection.encode_captions(
            given, options, reading={k: reading[k] for k in ("images", "fmt", "split")}, stores=stores,
            on_progress=on_progress, place=(place.rank, place.world_size),
        )  # fmt: skip
    finally:
        progress.stop()
    if not quiet:
        what = "reusing" if result.noop else "encoded"
        stderr.print(f"{role} captions: {result.captions} ({what} {result.out})", highlight=False)
        if result.empty:
            stderr.print(f"[yellow]warning:[/] skipped {result.empty} empty caption(s)", highlight=False)
    return result.out
