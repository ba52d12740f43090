"""`clipcap inspect`: read a model's prefix for some images as its nearest GPT-2 tokens."""

from __future__ import annotations

import sys
from typing import Any, List, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.captioner import BATCH_SIZE
from clipcap_cli.cli.commands.options import (
    ClipOption,
    ClipPretrainedOption,
    DeviceOption,
    Gpt2AliasOption,
    LmOption,
    ModelOption,
    NormalizePrefixOption,
    lm_choice,
)
from clipcap_cli.decoding.interpret import TOP

HELP = """Read a model's prefix as words: each image's caption, and the GPT-2 tokens nearest to each prefix embedding.

As the paper's prefix interpretation: for each of the K prefix embeddings the mapper makes, the vocabulary tokens whose GPT-2 input embeddings are closest to it by cosine similarity, with that similarity.

With GPT-2 fine-tuned (the coco and conceptual models) the nearest tokens tend to be salient words of the image; with GPT-2 frozen (coco-transformer) they are unreadable, because the mapper must also steer the fixed language model.

Output: a table per image on a terminal; JSON Lines in a pipe (or with --jsonl), one record per image: {"path", "caption", "prefix": [{"position", "tokens": [{"token", "id", "cosine"}]}], "error"}. Exit code 3 if some images failed.

Example: [bold]clipcap inspect photo.jpg --model coco[/]   ·   [bold]clipcap inspect photos/*.jpg --top 3 --jsonl > prefixes.jsonl[/]
"""


def command(
    inputs: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Image files, folders, globs, http(s) URLs, or - for stdin (as clipcap caption).", show_default=False
        ),
    ] = None,
    model: ModelOption = "coco",
    clip: ClipOption = None,
    clip_pretrained: ClipPretrainedOption = None,
    lm: LmOption = None,
    gpt2: Gpt2AliasOption = None,
    normalize_prefix: NormalizePrefixOption = None,
    top: Annotated[
        int,
        typer.Option(
            "--top", "-k", help="Nearest tokens shown per prefix position (2: the nearest and the runner-up)."
        ),
    ] = TOP,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="JSON Lines even on a terminal.")] = False,
    device: DeviceOption = None,
) -> None:
    """Show the nearest GPT-2 tokens of each prefix position."""
    from clipcap_cli.cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.data import inputs as inputs_mod
        from clipcap_cli.errors import EXIT_PARTIAL, UsageError
        from clipcap_cli.weights.registry import check_model_argument

        if top < 1:
            raise UsageError(f"--top must be at least 1, got {top}")
        check_model_argument(model)
        sources = inputs_mod.collect(inputs or [], stdin=sys.stdin if "-" in (inputs or []) else None)
        if not sources:
            raise UsageError("no inputs: give image files, folders, globs, URLs, or - to read paths from stdin")
        model_args = dict(
            name_or_path=model,
            clip_model=clip,
            clip_pretrained=clip_pretrained,
            gpt2=lm_choice(lm, gpt2),
            normalize_prefix=normalize_prefix,
            device=device,
        )
        records = [_finite(r) for r in _inspect(sources, model_args, top)]
        if jsonl or not _is_terminal():
            from clipcap_cli.records import dumps

            for record in records:
                print(dumps(record))
        else:
            _render(records)
        failed = [r for r in records if r["error"] is not None]
        if failed:
            from clipcap_cli.cli.ui import warn

            for record in failed:
                warn(f"{record['path']}: {record['error']}")
            raise typer.Exit(EXIT_PARTIAL)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose cosines are not all finite numbers becomes an error (JSON output never holds NaN)."""
    import math

    cosines = [t["cosine"] for p in record.get("prefix") or [] for t in p["tokens"]]
    if all(math.isfinite(c) for c in cosines):
        return record
    return {
        **record,
        "caption": None,
        "prefix": None,
        "error": "non-finite prefix: the model produced NaN or infinity; check its weights",
    }


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _inspect(sources: list[Any], model_args: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """One record per source, in order (failed inputs get an error and no prefix)."""

    from clipcap_cli.data import inputs
    from clipcap_cli.decoding.interpret import read_prefix
    from clipcap_cli.loading import load_model

    if not any(s.error is None for s in sources):  # nothing readable: no model to load
        return [{"path": s.name, "caption": None, "prefix": None, "error": s.error} for s in sources]
    captioner = load_model(**model_args)
    records: list[dict[str, Any]] = []
    for batch in inputs.load_batches(sources, captioner.preprocess_image, BATCH_SIZE, 0):
        readings = {}
        if batch.pixels is not None:
            embeddings = captioner.encode_pixels(batch.pixels)
            readings = dict(zip(batch.pixel_positions, read_prefix(captioner, embeddings, top)))
        for position, i in enumerate(batch.indices):
            reading = readings.get(position)
            record = {"path": sources[i].name, **(reading.to_dict() if reading else {"caption": None, "prefix": None})}
            records.append({**record, "error": batch.errors.get(position)})
    return records


def _render(records: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from clipcap_cli.cli.ui import stdout

    for record in records:
        if record["error"] is not None:
            continue
        top = len(record["prefix"][0]["tokens"]) if record["prefix"] else 0
        table = Table(title=f"{escape(record['path'])}: {escape(record['caption'])}", title_justify="left")
        table.add_column("position", justify="right")
        for rank in range(top):
            table.add_column(
                "nearest token" if rank == 0 else "runner-up" if rank == 1 else f"#{rank + 1}", overflow="fold"
            )
            table.add_column("cosine", justify="right", style="dim")
        for position in record["prefix"]:
            cells = [str(position["position"])]
            for token in position["tokens"]:
                cells += [escape(repr(token["token"])), f"{token['cosine']:.3f}"]
            table.add_row(*cells)
        stdout.print(table)
