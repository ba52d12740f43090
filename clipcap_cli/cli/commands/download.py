"""`clipcap download`: named pretrained models into the user data directory."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.cli.commands.options import JsonOption

HELP = """Download pretrained ClipCap models (and the CLIP and GPT-2 files they need) into the data directory.

Downloads resume after a dropped connection, are verified, and are shared by every command.
Names: coco, conceptual, coco-transformer, or all.

Example: [bold]clipcap download coco[/]   ·   [bold]clipcap download --list[/]   ·   [bold]clipcap download --path coco[/]
"""


def _complete_names(incomplete: str) -> list[str]:
    from clipcap_cli.weights.registry import names

    return [n for n in [*names(), "all"] if n.startswith(incomplete)]


def command(
    names: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Models to download: coco, conceptual, coco-transformer, or all.",
            autocompletion=_complete_names,
            show_default=False,
        ),
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", "-l", help="List the known models, their sizes and whether they are cached.")
    ] = False,
    json_: JsonOption = False,
    path: Annotated[
        Optional[str],
        typer.Option(
            "--path",
            metavar="NAME",
            help="Print where NAME's checkpoint is stored (exit 1 if not downloaded).",
            autocompletion=_complete_names,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Download again even when a verified copy is cached.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress; print only the checkpoint paths (for scripts).")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            envvar="CLIPCAP_OFFLINE",
            help="Never use the network: say what is missing and where to put it.",
        ),
    ] = False,
    backbones_: Annotated[
        bool,
        typer.Option(
            "--backbones/--no-backbones", help="Also fetch the CLIP backbone and GPT-2 tokenizer each model needs."
        ),
    ] = True,
) -> None:
    from clipcap_cli.cli.ui import cli_errors, stderr, stdout

    with cli_errors():
        import os

        from clipcap_cli.weights import registry as pretrained

        if offline:
            os.environ["CLIPCAP_OFFLINE"] = "1"
        from clipcap_cli.errors import EXIT_FATAL, UsageError

        if list_:
            _print_list(json_ or not sys.stdout.isatty())
            return
        if path:
            model = pretrained.get(path)
            print(model.path)
            if not pretrained.is_cached(model):
                stderr.print(f"[yellow]'{model.name}' is not downloaded yet:[/] run `clipcap download {model.name}`")
                raise typer.Exit(EXIT_FATAL)
            return
        if not names:
            raise UsageError("name a model to download (coco, conceptual, coco-transformer, all), or use --list")
        wanted = pretrained.names() if "all" in names else [pretrained.get(n).name for n in names]
        for name in dict.fromkeys(wanted):
            model = pretrained.get(name)
            result = _fetch_with_progress(model, force=force, quiet=quiet)
            if backbones_:
                _fetch_backbones(model, quiet=quiet)
            if quiet:
                print(result)
            else:
                stdout.print(f"[green]✓[/] {model.name}: {result}", highlight=False)


def _fetch_with_progress(model, *, force: bool, quiet: bool):
    from clipcap_cli import loading, paths
    from clipcap_cli.cli import ui
    from clipcap_cli.weights import registry as pretrained

    if pretrained.is_cached(model) and not force:
        pretrained.check_cached(model)  # the bytes it was verified with, or say to use --force
        return model.path
    if not paths.can_download():
        path = pretrained.fetch(model, force=force)  # fails at once with what to download and where
    else:
        with ui.byte_progress(quiet=quiet) as bar:
            task = bar.add_task(f"{model.name}", total=model.approx_size)

            def progress(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total or model.approx_size)

            path = pretrained.fetch(model, force=force, progress=progress)
    loading.verify_download(model)  # keys and shapes, then the one-time safetensors conversion
    return path


def _fetch_backbones(model, *, quiet: bool) -> None:
    from clipcap_cli.cli.ui import stderr
    from clipcap_cli.weights import backbones, checkpoint, clip_tower

    clip_name, clip_tag = model.clip
    if not quiet:
        stderr.print(
            f"fetching CLIP {clip_name} ({clip_tag}) and GPT-2 '{model.gpt2}' (tokenizer, config) ...", highlight=False
        )
    clip_tower.load_clip(clip_name, clip_tag, "cpu")
    backbones.load_tokenizer(model.gpt2)
    backbones.gpt2_config(model.gpt2)
    if not checkpoint.holds_lm(model.path.with_suffix(".safetensors")):
        backbones.gpt2_weights(model.gpt2)  # a frozen-LM file without GPT-2: its weights come from the hub


def _print_list(as_json: bool) -> None:
    from clipcap_cli.cli.ui import stdout
    from clipcap_cli.weights import registry as pretrained

    rows = []
    for model in pretrained.REGISTRY.values():
        cached = pretrained.is_cached(model)
        rows.append(
            {
                "name": model.name,
                "description": model.description,
                "size": model.path.stat().st_size if cached else model.approx_size,
                "cached": cached,
                "path": str(model.path),
                "clip": f"{model.clip[0]}/{model.clip[1]}",
                "sha256": pretrained.recorded_sha256(model),
                "verified_by": pretrained.record(model).get("verified_by"),
                "urls": list(model.urls),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="ClipCap models")
    for col in ("name", "description", "size", "cached", "sha256", "path"):
        table.add_column(col)
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "?"
        sha = (r["sha256"] or "")[:12] + (
            f" (verified by {r['verified_by']})" if r["verified_by"] else " (unverified)" if r["sha256"] else ""
        )
        table.add_row(r["name"], r["description"], size, "[green]yes[/]" if r["cached"] else "no", sha, r["path"])
    stdout.print(table)
