"""`clipcap caption`: caption images from files, folders, globs, URLs or stdin."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.batch.sharded import ShardedOptions
from clipcap_cli.cli.commands.caption_options import (
    EmbeddingsOption,
    PrefixOption,
    SidecarDirOption,
    SidecarExistsOption,
    SidecarOption,
    SuffixOption,
)
from clipcap_cli.cli.commands.options import (
    ClipOption,
    ClipPretrainedOption,
    DeviceOption,
    Gpt2AliasOption,
    ImageWorkersOption,
    LmOption,
    ModelOption,
    NormalizePrefixOption,
    PrecisionOption,
    QuietOption,
    StopTokenOption,
    lm_choice,
)
from clipcap_cli.cli.output import available_formats
from clipcap_cli.cli.sidecar_out import SidecarOptions, from_flags
from clipcap_cli.data.inputs import URL_DEADLINE, WORKERS
from clipcap_cli.decoding.decode import CPU_BATCH_SIZE, DecodingOptions
from clipcap_cli.decoding.precision import DEFAULT_PRECISION

HELP = """Caption images: files, folders, globs, http(s) URLs, or - to read paths and URLs from stdin;
with --output-dir, also webdataset tar shards, in sharded, resumable runs over many processes.

Captions go to stdout (a table on a terminal, JSON Lines in a pipe), progress and errors to stderr.
A bad input never stops the run: it gets a record with its error.

With --output-dir DIR each shard NAME (a tar file, or --shard-size images of a list) gets DIR/NAME.jsonl
(or .parquet) and, last, DIR/NAME.stats.json: the same command again skips finished shards and redoes the rest.
Under torchrun the shards are split by rank; --shard i/n splits them for Slurm arrays or plain processes.

With --sidecar .txt each caption also goes to a file beside its image (photo.txt; --sidecar-dir DIR: a mirrored tree);
existing files are skipped (their images not captioned), so a rerun resumes. --embeddings PATH captions stored CLIP
embeddings (clip-retrieval output, features stores, --save-embeddings files) without reading any image.

Exit codes: 0 all captioned, 1 fatal error (e.g. the model is missing), 2 usage error (no inputs, bad options), 3 some inputs failed
(under torchrun 0, since torchrun takes any other code for a crash: see DIR/_summary.json).

Example: [bold]clipcap caption photos/ --recursive --beam 5 > captions.jsonl[/]   ·   [bold]find . -name '*.jpg' | clipcap caption - --format csv[/]

Example: [bold]clipcap caption photo.jpg --rerank clip[/] (5 beams, the one CLIP scores highest first)   ·   [bold]clipcap caption photo.jpg --sample -n 8 --rerank clip[/]   ·   [bold]torchrun --nproc_per_node 8 -m clipcap_cli caption 'shards/{00000..00999}.tar' --output-dir captions/[/]
"""

MODEL = "Model"
DECODING = "Decoding"
OUTPUT = "Output"
SHARDED = "Sharded output (--output-dir)"
RUN = "Run"
S = ShardedOptions  # defaults of the sharded options


def command(
    inputs: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Image files, folders, globs (quoted ones are expanded too), http(s) URLs, - for stdin; with --output-dir also tar shards: a path, glob or brace pattern like 'shards/{00000..00099}.tar'.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = "coco",
    clip: ClipOption = None,
    clip_pretrained: ClipPretrainedOption = None,
    lm: LmOption = None,
    gpt2: Gpt2AliasOption = None,
    normalize_prefix: NormalizePrefixOption = None,
    precision: PrecisionOption = DEFAULT_PRECISION,
    beam: Annotated[
        Optional[int],
        typer.Option(
            "--beam",
            metavar="N",
            help=f"Beam search with N beams, the original's beam search (its notebooks used {DecodingOptions.beam_size}). Default: greedy.",
            rich_help_panel=DECODING,
            show_default=False,
        ),
    ] = None,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="Sample instead of searching (see --top-p, --top-k, --temperature, --seed).",
            rich_help_panel=DECODING,
        ),
    ] = False,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p",
            help="Sampling: keep the smallest set of tokens with this much probability.",
            rich_help_panel=DECODING,
        ),
    ] = DecodingOptions.top_p,
    top_k: Annotated[
        int,
        typer.Option("--top-k", help="Sampling: keep the K likeliest tokens (0 = no limit).", rich_help_panel=DECODING),
    ] = DecodingOptions.top_k,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", help="Divide logits by this (beam search and sampling).", rich_help_panel=DECODING
        ),
    ] = DecodingOptions.temperature,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed",
            help="Sampling: make the samples reproducible (image i uses seed + i).",
            rich_help_panel=DECODING,
            show_default=False,
        ),
    ] = DecodingOptions.seed,
    rerank: Annotated[
        Optional[str],
        typer.Option(
            "--rerank",
            metavar="clip",
            help="Decode candidates (--beam N: all N beams, 5 by default; --sample -n N: N samples) and put the one CLIP matches best first: CLIPScore on the model's own CLIP, added to records as clip_score (clip_scores with -n).",
            rich_help_panel=DECODING,
            show_default=False,
        ),
    ] = DecodingOptions.rerank,
    num_captions: Annotated[
        int,
        typer.Option(
            "--num-captions",
            "-n",
            help="Captions per image: the N best beams (N <= --beam) or N samples.",
            rich_help_panel=DECODING,
        ),
    ] = DecodingOptions.num_captions,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Most tokens per caption.", rich_help_panel=DECODING)
    ] = DecodingOptions.max_length,
    stop_token: StopTokenOption = DecodingOptions.stop_token,
    format_: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            "-f",
            help=f"{', '.join(available_formats())} (default: table on a terminal, jsonl otherwise, or from --output's suffix).",
            rich_help_panel=OUTPUT,
            show_default=False,
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Same as --format json.", rich_help_panel=OUTPUT)] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Same as --format jsonl.", rich_help_panel=OUTPUT)] = False,
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write results to FILE (atomically) instead of stdout.",
            rich_help_panel=OUTPUT,
            show_default=False,
        ),
    ] = None,
    quiet: QuietOption = False,
    output_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--output-dir",
            "-O",
            metavar="DIR",
            help="Sidecar files per input shard in DIR (NAME.jsonl, NAME.stats.json, ...), resumable: e.g. --output-dir captions/.",
            rich_help_panel=SHARDED,
            show_default=False,
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--output-format",
            help="jsonl, or parquet (needs pyarrow: pip install 'clipcap-cli\\[parquet]'), e.g. --output-format parquet.",
            rich_help_panel=SHARDED,
        ),
    ] = S.output_format,
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size",
            metavar="N",
            help="Images per shard when the inputs are files, folders or lists (tar shards stay as they are).",
            rich_help_panel=SHARDED,
        ),
    ] = S.shard_size,
    shard: Annotated[
        Optional[str],
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Take only shards s with s mod N == I, e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT (under torchrun each rank splits its share again).",
            rich_help_panel=SHARDED,
            show_default=False,
        ),
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Re-caption the samples whose records carry an error, in shards already done.",
            rich_help_panel=SHARDED,
        ),
    ] = S.retry_failed,
    save_embeddings: Annotated[
        bool,
        typer.Option(
            "--save-embeddings",
            help="Also write NAME.emb.safetensors: the CLIP image embeddings, one row per record.",
            rich_help_panel=SHARDED,
        ),
    ] = S.save_embeddings,
    sidecar: SidecarOption = None,
    sidecar_dir: SidecarDirOption = None,
    sidecar_exists: SidecarExistsOption = SidecarOptions.exists,
    prefix: PrefixOption = SidecarOptions.prefix,
    suffix: SuffixOption = SidecarOptions.suffix,
    embeddings: EmbeddingsOption = None,
    url_timeout: Annotated[
        float,
        typer.Option(
            "--url-timeout",
            metavar="SECONDS",
            help="Most seconds one http(s) URL may take to download, however slowly its server sends; a slower one gets an error record.",
            rich_help_panel=RUN,
        ),
    ] = URL_DEADLINE,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive", "-r", help="Look for images in subfolders of folder inputs too.", rich_help_panel=RUN
        ),
    ] = False,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            "-b",
            help=f"Images per CLIP and decoding batch. Default: what keeps the device busy (on the CPU {CPU_BATCH_SIZE['greedy']} greedy, {CPU_BATCH_SIZE['beam']} beam; on CUDA from free memory), e.g. -b 16.",
            rich_help_panel=RUN,
            show_default=False,
        ),
    ] = None,
    workers: ImageWorkersOption = WORKERS,
    device: DeviceOption = None,
) -> None:
    """Caption images."""
    from clipcap_cli.cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.errors import UsageError

        if beam is not None and sample:
            raise UsageError("--beam and --sample are alternatives: choose one")
        from clipcap_cli.data.inputs import check_loading

        check_loading(batch_size, workers)
        from clipcap_cli.cli.ui import as_flags
        from clipcap_cli.errors import check_number

        try:
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
            check_number("url deadline", url_timeout, low=0, low_open=True)
        except UsageError as exc:
            raise as_flags(exc) from None
        # Everything that makes the model: load_model's arguments, and (less the device) what an
        # --output-dir records and checks on resume. A new model option is one more entry here.
        model_args: dict[str, Any] = dict(
            name_or_path=model,
            clip_model=clip,
            clip_pretrained=clip_pretrained,
            gpt2=lm_choice(lm, gpt2),
            normalize_prefix=normalize_prefix,
            precision=precision,
        )
        from clipcap_cli.weights.registry import check_model_argument

        sharded_given = {
            "--output-format": output_format != S.output_format,
            "--shard-size": shard_size != S.shard_size,
            "--shard": shard is not None,
            "--retry-failed": retry_failed,
            "--save-embeddings": save_embeddings,
        }
        sidecars = from_flags(sidecar, sidecar_dir, sidecar_exists, prefix, suffix)
        if sidecars is not None and (output_dir is not None or embeddings):
            raise UsageError(
                "--sidecar, --sidecar-dir: not with --output-dir or --embeddings (caption files go beside images)"
            )
        if embeddings and inputs:
            raise UsageError("--embeddings PATH captions stored embeddings: give no image inputs with it")
        if output_dir is None:
            if any(sharded_given.values()):
                raise UsageError(f"{', '.join(k for k, on in sharded_given.items() if on)}: only with --output-dir DIR")
            fmt = _pick_format(format_, json_, jsonl, output)
            check_model_argument(model)  # a typo in --model is a usage error before any input is read
            if embeddings:
                from clipcap_cli.cli.commands.caption_embeddings import caption_embeddings

                failed = caption_embeddings(
                    embeddings, options, fmt, output, quiet, batch_size, {**model_args, "device": device}, _load
                )
            else:
                failed = _run(
                    inputs or [],
                    options,
                    fmt,
                    output,
                    quiet,
                    (recursive, url_timeout),
                    batch_size,
                    workers,
                    {**model_args, "device": device},
                    sidecars,
                )
        else:
            stdout_options = [
                flag
                for flag, on in (("--output", output), ("--format", format_), ("--json", json_), ("--jsonl", jsonl))
                if on
            ]
            if stdout_options:
                raise UsageError(f"{', '.join(stdout_options)}: not with --output-dir (records go to DIR/NAME.jsonl)")
            sharded = ShardedOptions(
                output_dir=output_dir.expanduser(),
                output_format=output_format,
                save_embeddings=save_embeddings,
                retry_failed=retry_failed,
                shard_size=shard_size,
                shard=_parse_shard(shard),
                batch_size=batch_size,
                workers=0 if embeddings and workers is None else workers,  # stored embeddings need no decoding
            )
            check_model_argument(model)
            from clipcap_cli.cli.commands.caption_sharded import run_sharded

            failed = run_sharded(
                inputs or [], options, sharded, quiet, (recursive, url_timeout), model_args, device, embeddings, _load
            )
        if failed:
            from clipcap_cli.errors import EXIT_PARTIAL

            raise typer.Exit(EXIT_PARTIAL)


def _parse_shard(text: str | None) -> tuple[int, int]:
    from clipcap_cli.batch.shards import parse_shard

    return parse_shard(text) if text else (0, 1)


def _pick_format(requested: str | None, json_: bool, jsonl: bool, output: str | None) -> str:
    from clipcap_cli.cli import output as out
    from clipcap_cli.cli.ui import default_format
    from clipcap_cli.errors import UsageError

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
    reading: tuple[bool, float],
    batch_size: int | None,
    workers: int | None,
    model_args: dict[str, Any],
    sidecar: SidecarOptions | None = None,
) -> int:
    """Caption everything, streaming records to the writer (and caption files with ``sidecar``);
    returns how many inputs failed."""
    from clipcap_cli.batch.sharded_output import OffThread
    from clipcap_cli.batch.shards import is_tar_pattern
    from clipcap_cli.cli import output as out
    from clipcap_cli.cli import ui
    from clipcap_cli.cli.ui import stderr, warn
    from clipcap_cli.data import inputs
    from clipcap_cli.errors import UsageError
    from clipcap_cli.records import make_record

    tars = [a for a in args if is_tar_pattern(a)]
    if tars:
        raise UsageError(f"{tars[0]}: tar shards are captioned into sidecar files: add --output-dir DIR")
    recursive, url_timeout = reading  # --recursive, --url-timeout
    sources = inputs.collect(
        args, recursive=recursive, stdin=sys.stdin if "-" in args else None, url_deadline=url_timeout
    )
    if not sources:
        raise UsageError("no inputs: give image files, folders, globs, URLs, or - to read paths from stdin")
    from clipcap_cli.fsutil import refuse_inputs

    refuse_inputs(output, (s.location for s in sources if s.location and not inputs.is_url(s.location)), "--output")
    files = None
    if sidecar is not None:
        from clipcap_cli.cli.sidecar_out import Sidecars

        files = Sidecars.plan(sidecar, sources, args)
        sources = files.pending(sources)  # skip: an existing caption file means its image is done

    # No model is loaded when every input already failed (e.g. missing files).
    captioner = _load(model_args, options, quiet) if any(s.error is None for s in sources) else None
    outcomes = (
        (
            (c.index, c.error, c.result)
            for c in captioner.stream(sources, options, batch_size=batch_size, workers=workers)
        )
        if captioner is not None
        else ((i, s.error, None) for i, s in enumerate(sources))
    )
    alternatives = options.num_captions > 1
    failed = done = 0
    start = time.perf_counter()
    target = out.AtomicFile(output) if output else contextlib.nullcontext(sys.stdout)
    with target as stream, ui.item_progress("images", quiet) as progress, OffThread() as background:
        strategy = options.search
        decoding = strategy + (f" {options.beam_size}" if strategy == "beam" else "")
        decoding += f", reranked by {options.rerank}" if options.rerank else ""
        writer = out.get_writer(fmt, stream, settings=f"model {model_args['name_or_path']}, {decoding}")
        task = progress.add_task("captioning", total=len(sources))
        pending: list[dict] = []
        for i, error, result in outcomes:
            record = make_record(sources[i].name, result, error, alternatives, clip=options.rerank is not None)
            if files is not None:
                record["error"] = files.write(sources[i], record["caption"]) or record["error"]
            if record["error"] is not None:
                failed += 1
                if not quiet:
                    warn(f"{sources[i].name}: {record['error']}")
            pending.append(record)
            done += 1
            progress.advance(task)
            if len(pending) >= (batch_size or 64) or done == len(sources):
                background.submit(writer.write, pending)  # formatting and writing, off the model's path
                pending = []
        background.submit(writer.close)
    if not quiet:
        seconds = time.perf_counter() - start
        summary = f"captioned {done - failed} of {done} images in {seconds:.1f} s ({(done - failed) / max(seconds, 1e-9):.2f} images/s)"
        if output:
            summary += f"; wrote {output}"
        if files is not None:
            summary += f"; {files.counts.line()}"
        stderr.print(summary + (f"; [red]{failed} failed[/]" if failed else ""), highlight=False)
    return failed


def _load(model_args: dict[str, Any], options: DecodingOptions, quiet: bool) -> Any:
    from clipcap_cli.cli.ui import say
    from clipcap_cli.loading import load_model

    with _download_progress(quiet) as progress_cb:
        captioner = load_model(**model_args, download_progress=progress_cb)
    say(f"model {model_args['name_or_path']}: {captioner!r}; decoding {options}")
    return captioner


@contextlib.contextmanager
def _download_progress(quiet: bool) -> Any:
    """A byte progress bar that appears only if a registry model actually downloads."""
    from clipcap_cli.cli import ui

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
