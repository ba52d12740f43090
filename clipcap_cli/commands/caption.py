"""`clipcap caption`: caption images from files, folders, globs, URLs or stdin."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, List, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.captioner import BATCH_SIZE, WORKERS
from clipcap_cli.decoding import DecodingOptions
from clipcap_cli.output import available_formats
from clipcap_cli.ui import complete_model

HELP = """Caption images: files, folders, globs, http(s) URLs, or - to read paths and URLs from stdin.

Captions go to stdout (a table on a terminal, JSON Lines in a pipe), progress and errors to stderr.
A bad input never stops the run: it gets a record with its error.

Exit codes: 0 all captioned, 1 fatal error (e.g. the model is missing), 2 usage error (no inputs, bad options), 3 some inputs failed.

Example: [bold]clipcap caption photos/ --recursive --beam 5 > captions.jsonl[/]   ·   [bold]find . -name '*.jpg' | clipcap caption - --format csv[/]

Example: [bold]clipcap caption photo.jpg --rerank clip[/] (5 beams, the one CLIP scores highest first)   ·   [bold]clipcap caption photo.jpg --sample -n 8 --rerank clip[/]
"""

MODEL = "Model"
DECODING = "Decoding"
OUTPUT = "Output"
RUN = "Run"


def command(
    inputs: Annotated[
        Optional[List[str]],
        typer.Argument(help="Image files, folders, globs (quoted ones are expanded too), http(s) URLs, or - for stdin.", show_default=False),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name (coco, conceptual, coco-transformer) or checkpoint file.", rich_help_panel=MODEL, autocompletion=complete_model)] = "coco",
    clip: Annotated[Optional[str], typer.Option("--clip", help="CLIP model (open_clip name or local-dir:PATH) instead of the checkpoint's.", rich_help_panel=MODEL, show_default=False)] = None,
    clip_pretrained: Annotated[Optional[str], typer.Option("--clip-pretrained", help="open_clip pretrained tag for --clip (e.g. openai).", rich_help_panel=MODEL, show_default=False)] = None,
    gpt2: Annotated[Optional[str], typer.Option("--gpt2", help="GPT-2 name or local folder (tokenizer, and weights for frozen-LM checkpoints).", rich_help_panel=MODEL, show_default=False)] = None,
    normalize_prefix: Annotated[Optional[bool], typer.Option("--normalize-prefix/--no-normalize-prefix", help="L2-normalise CLIP embeddings before the mapper (default: what the checkpoint implies).", rich_help_panel=MODEL, show_default=False)] = None,
    beam: Annotated[Optional[int], typer.Option("--beam", metavar="N", help=f"Beam search with N beams, the original's beam search (its notebooks used {DecodingOptions.beam_size}). Default: greedy.", rich_help_panel=DECODING, show_default=False)] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of searching (see --top-p, --top-k, --temperature, --seed).", rich_help_panel=DECODING)] = False,
    top_p: Annotated[float, typer.Option("--top-p", help="Sampling: keep the smallest set of tokens with this much probability.", rich_help_panel=DECODING)] = DecodingOptions.top_p,
    top_k: Annotated[int, typer.Option("--top-k", help="Sampling: keep the K likeliest tokens (0 = no limit).", rich_help_panel=DECODING)] = DecodingOptions.top_k,
    temperature: Annotated[float, typer.Option("--temperature", help="Divide logits by this (beam search and sampling).", rich_help_panel=DECODING)] = DecodingOptions.temperature,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling: make the samples reproducible (image i uses seed + i).", rich_help_panel=DECODING, show_default=False)] = DecodingOptions.seed,
    rerank: Annotated[Optional[str], typer.Option("--rerank", metavar="clip", help="Decode candidates (--beam N: all N beams, 5 by default; --sample -n N: N samples) and put the one CLIP matches best first: CLIPScore on the model's own CLIP, added to records as clip_score (clip_scores with -n).", rich_help_panel=DECODING, show_default=False)] = DecodingOptions.rerank,
    num_captions: Annotated[int, typer.Option("--num-captions", "-n", help="Captions per image: the N best beams (N <= --beam) or N samples.", rich_help_panel=DECODING)] = DecodingOptions.num_captions,
    max_length: Annotated[int, typer.Option("--max-length", help="Most tokens per caption.", rich_help_panel=DECODING)] = DecodingOptions.max_length,
    stop_token: Annotated[Optional[str], typer.Option("--stop-token", help="Stop after this token (default: the model's, \".\").", rich_help_panel=DECODING, show_default=False)] = DecodingOptions.stop_token,
    format_: Annotated[Optional[str], typer.Option("--format", "-f", help=f"{', '.join(available_formats())} (default: table on a terminal, jsonl otherwise, or from --output's suffix).", rich_help_panel=OUTPUT, show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Same as --format json.", rich_help_panel=OUTPUT)] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Same as --format jsonl.", rich_help_panel=OUTPUT)] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write results to FILE (atomically) instead of stdout.", rich_help_panel=OUTPUT, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, warnings or summary on stderr.", rich_help_panel=OUTPUT)] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look for images in subfolders of folder inputs too.", rich_help_panel=RUN)] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per CLIP and decoding batch.", rich_help_panel=RUN)] = BATCH_SIZE,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes that read and decode images (0 = in this process).", rich_help_panel=RUN)] = WORKERS,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the best available).", rich_help_panel=RUN, show_default=False)] = None,
) -> None:
    """Caption images."""
    from clipcap_cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.errors import UsageError

        if beam is not None and sample:
            raise UsageError("--beam and --sample are alternatives: choose one")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {workers}")
        options = DecodingOptions(
            strategy="beam" if beam is not None else "sample" if sample else "greedy",
            beam_size=beam if beam is not None else DecodingOptions.beam_size,
            num_captions=num_captions,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            seed=seed,
            max_length=max_length,
            stop_token=stop_token,
            rerank=rerank,
        )
        fmt = _pick_format(format_, json_, jsonl, output)
        from clipcap_cli.pretrained import check_model_argument

        check_model_argument(model)  # a typo in --model is a usage error before any input is read
        failed = _run(
            inputs or [], options, fmt, output, quiet, recursive, batch_size, workers,
            dict(name_or_path=model, device=device, clip_model=clip, clip_pretrained=clip_pretrained, gpt2=gpt2,
                 normalize_prefix=normalize_prefix),
        )
        if failed:
            from clipcap_cli.errors import EXIT_PARTIAL

            raise typer.Exit(EXIT_PARTIAL)


def _pick_format(requested: str | None, json_: bool, jsonl: bool, output: str | None) -> str:
    from clipcap_cli import output as out
    from clipcap_cli.errors import UsageError
    from clipcap_cli.ui import default_format

    asked = {f for f, on in ((requested, requested is not None), ("json", json_), ("jsonl", jsonl)) if on}
    if len(asked) > 1:
        raise UsageError(f"conflicting output formats: {', '.join(sorted(asked))}")
    fmt = asked.pop() if asked else None
    if fmt is not None and fmt not in out.available_formats():
        raise UsageError(f"unknown output format {fmt!r}: choose one of {', '.join(out.available_formats())}")
    if output:
        fmt = fmt or out.format_for_path(output) or "jsonl"
        if fmt == "table":
            raise UsageError("the table format is for terminals: choose text, json, jsonl or csv for --output")
        return fmt
    return default_format(fmt)


def _run(
    args: list[str],
    options: DecodingOptions,
    fmt: str,
    output: str | None,
    quiet: bool,
    recursive: bool,
    batch_size: int,
    workers: int,
    model_args: dict[str, Any],
) -> int:
    """Caption everything, streaming records to the writer; returns how many inputs failed."""
    from clipcap_cli import inputs, ui
    from clipcap_cli import output as out
    from clipcap_cli.ui import say, stderr, warn
    from clipcap_cli.errors import UsageError

    sources = inputs.collect(args, recursive=recursive, stdin=sys.stdin if "-" in args else None)
    if not sources:
        raise UsageError("no inputs: give image files, folders, globs, URLs, or - to read paths from stdin")

    import torch

    from clipcap_cli.loading import load_model

    captioner = None
    if any(s.error is None for s in sources):  # nothing to caption: report the inputs without loading a model
        with _download_progress(quiet) as progress_cb:
            captioner = load_model(**model_args, download_progress=progress_cb)
        say(f"model {model_args['name_or_path']}: {captioner!r}; decoding {options}")
    transform = captioner.preprocess_image if captioner else None

    alternatives = options.num_captions > 1
    failed = done = 0
    start = time.perf_counter()
    target = out.AtomicFile(output) if output else contextlib.nullcontext(sys.stdout)
    with target as stream, ui.item_progress("images", quiet) as progress:
        strategy = "beam" if options.rerank and options.strategy == "greedy" else options.strategy  # see candidate_options
        decoding = strategy + (f" {options.beam_size}" if strategy == "beam" else "")
        decoding += f", reranked by {options.rerank}" if options.rerank else ""
        writer = out.get_writer(fmt, stream, settings=f"model {model_args['name_or_path']}, {decoding}")
        task = progress.add_task("captioning", total=len(sources))
        for batch in inputs.load_batches(sources, transform, batch_size, workers):
            good = [(i, pixels) for i, pixels, error in batch if error is None]
            results = {}
            if good and captioner is not None:
                ids = [i for i, _ in good]
                decoded = captioner.caption_pixels(torch.stack([p for _, p in good]), options, image_ids=ids)
                results = dict(zip(ids, decoded))
            records = []
            for i, _, error in batch:
                name = sources[i].name
                if error is not None:
                    failed += 1
                    if not quiet:
                        warn(f"{name}: {error}")
                records.append(out.make_record(name, results.get(i), error, alternatives, clip=options.rerank is not None))
            writer.write(records)
            done += len(batch)
            progress.advance(task, len(batch))
        writer.close()
    if not quiet:
        seconds = time.perf_counter() - start
        summary = f"captioned {done - failed} of {done} images in {seconds:.1f} s ({(done - failed) / max(seconds, 1e-9):.2f} images/s)"
        if output:
            summary += f"; wrote {output}"
        stderr.print(summary + (f"; [red]{failed} failed[/]" if failed else ""), highlight=False)
    return failed


@contextlib.contextmanager
def _download_progress(quiet: bool) -> Any:
    """A byte progress bar that appears only if a registry model actually downloads."""
    from clipcap_cli import ui

    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        if "bar" not in state:
            state["bar"] = ui.byte_progress(quiet)
            state["bar"].start()
            state["task"] = state["bar"].add_task("downloading model", total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()
