"""`clipcap caption --output-dir DIR`: the sharded, resumable run (``clipcap_cli.batch.sharded``) as the CLI drives
it: discovering the shards (tar shards and lists, or stored embeddings), the progress bar, the summary line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcap_cli.batch.sharded import ShardedOptions
from clipcap_cli.decoding.decode import DecodingOptions


def run_sharded(
    args: list[str],
    options: DecodingOptions,
    sharded: ShardedOptions,
    quiet: bool,
    reading: tuple[bool, float],
    model_args: dict[str, Any],
    device: str | None,
    embeddings: list[str] | None,
    load_model: Callable[[dict[str, Any], DecodingOptions, bool], Any],
) -> int:
    """Caption shards into sidecar files (see ``clipcap_cli.batch.sharded``); returns how many of this
    process's samples failed (0 under torchrun, where another exit code reads as a crash)."""
    import dataclasses

    from clipcap_cli import distributed
    from clipcap_cli.batch import sharded as runner
    from clipcap_cli.batch import shards
    from clipcap_cli.cli import ui
    from clipcap_cli.cli.ui import stderr

    recursive, url_timeout = reading  # --recursive, --url-timeout
    if embeddings:
        from clipcap_cli.data import embeddings_in

        job = embeddings_in.discover(embeddings, sharded.shard_size)
        embeddings_in.refuse_output(job, sharded.output_dir)
    else:
        job = shards.discover(
            args,
            recursive=recursive,
            stdin=sys.stdin if "-" in args else None,
            shard_size=sharded.shard_size,
            url_deadline=url_timeout,
        )
    settings = {
        "model": _model_identity(model_args),
        "weights": _weights(model_args),  # contents, not names: other weights at the same path are refused
        "decoding": dataclasses.asdict(options),
        "output_format": sharded.output_format,
        "save_embeddings": sharded.save_embeddings,
        "shard_size": sharded.shard_size,
    }
    place = distributed.env()
    dist = distributed.Distributed.setup(device or distributed.local_device()) if place.launched else None
    main = place.rank == 0
    quiet = quiet or not main  # one progress bar and one summary: rank 0's

    def load() -> Any:
        captioner = load_model({**model_args, "device": str(dist.device) if dist else device}, options, quiet)
        if embeddings:
            embeddings_in.check(job, captioner.config)  # before any shard is captioned: one line, exit 2
        return captioner

    progress = ui.item_progress("images", quiet)
    task = progress.add_task("captioning", total=None)

    def show(p: runner.Progress) -> None:
        if not p.shards:
            return  # nothing to do here: no bar
        if not progress.live.is_started:  # from the first count on: after the model has loaded
            progress.start()
            progress.reset(task)  # the rate's clock starts now, not before the model was loaded
        progress.update(
            task,
            completed=p.samples,
            total=p.expected or None,
            description=f"shard {p.shards_done}/{p.shards}" + (f", {p.failed} failed" if p.failed else ""),
        )

    try:
        outcome = runner.run(job, load, options, settings, sharded, dist=dist, on_progress=show)
    finally:
        if progress.live.is_started:
            progress.stop()
        if dist is not None:
            dist.close()
    if not quiet:
        stderr.print(_summary_line(outcome.summary, sharded), highlight=False)
    return 0 if dist is not None else outcome.failed_here


def _model_identity(model_args: dict[str, Any]) -> dict[str, Any]:
    """The model settings an output folder records: ``model_args`` with a checkpoint file's full path."""
    identity = dict(model_args)
    path = Path(str(identity["name_or_path"])).expanduser()
    if path.is_file():
        identity["name_or_path"] = str(path.resolve())
    return identity


def _weights(model_args: dict[str, Any]) -> dict[str, str | None]:
    """sha256 fingerprints of the weights the model is made of (checkpoint; a local CLIP or GPT-2 folder)."""
    from clipcap_cli.weights.clip_tower import LOCAL_DIR
    from clipcap_cli.weights.fingerprint import weights_fingerprint

    found = {"checkpoint": weights_fingerprint(str(model_args["name_or_path"]))}
    clip, gpt2 = model_args.get("clip_model"), model_args.get("gpt2")
    if clip and str(clip).startswith(LOCAL_DIR):
        found["clip"] = weights_fingerprint(str(clip)[len(LOCAL_DIR) :])
    if gpt2 and Path(str(gpt2)).expanduser().is_dir():
        found["gpt2"] = weights_fingerprint(str(gpt2))
    return found


def _summary_line(summary: dict, sharded: ShardedOptions) -> str:
    """The one line on stderr at the end: this run, then the output folder's state."""
    from rich.markup import escape

    run = summary["this_run"]
    rate = run["samples"] / max(run["seconds"], 1e-9)
    worked = run["samples"] or run["shards_done"]
    parts = [
        f"captioned {run['samples'] - run['failed']} of {run['samples']} samples in {run['shards_done']} shards "
        f"in {run['seconds']:.1f} s ({rate:.2f} images/s)"
        if worked
        else "nothing to do"
    ]
    if run["shards_skipped"]:
        parts.append(f"{run['shards_skipped']} shards were already done")
    line = "; ".join(parts)
    if run["retried"]:
        line += f"; retried {run['retried']}"
    state = "complete" if summary["complete"] else f"{summary['shards_done']} of {summary['shards']} shards done"
    line += f"; {escape(str(sharded.output_dir))}: {state}, {summary['ok']} ok"
    problems = summary["failed"] + len(summary["unreadable_shards"])
    if problems:
        logs = ", ".join(summary["error_logs"]) or "the records"
        line += f", [red]{summary['failed']} failed[/]"
        if summary["unreadable_shards"]:
            line += f", [red]{len(summary['unreadable_shards'])} unreadable shards[/]"
        line += f" (see {logs}; --retry-failed tries them again)"
    return line
