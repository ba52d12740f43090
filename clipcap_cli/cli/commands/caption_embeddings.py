"""`clipcap caption --embeddings PATH` without --output-dir: stored CLIP embeddings captioned to stdout
(or --output), one record per row keyed by the metadata (``embeddings_in``)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from clipcap_cli.decoding.decode import DecodingOptions


def caption_embeddings(
    paths: list[str],
    options: DecodingOptions,
    fmt: str,
    output: str | None,
    quiet: bool,
    batch_size: int | None,
    model_args: dict[str, Any],
    load: Callable[[dict[str, Any], DecodingOptions, bool], Any],
) -> int:
    """Caption every row of the stored embeddings, streaming records to the writer; returns how many
    rows (and unreadable files) failed."""
    from clipcap_cli.batch.sharded_output import OffThread, make_record
    from clipcap_cli.batch.shards import Sample, seed_id
    from clipcap_cli.cli import output as out
    from clipcap_cli.cli import ui
    from clipcap_cli.cli.ui import stderr, warn
    from clipcap_cli.data import embeddings_in
    from clipcap_cli.errors import UsageError

    if fmt == "html":
        raise UsageError("--format html shows the images: not with --embeddings (there are none)")
    shards = embeddings_in.discover(paths)
    captioner = load(model_args, options, quiet)
    embeddings_in.check(shards, captioner.config)  # before any work: one line, exit 2

    order: deque[Sample] = deque()
    problems: list[str] = []

    def samples() -> Iterator[Sample]:
        for shard in shards:
            found, problem = shard.samples()
            if problem is not None:
                problems.append(f"{shard.source}: {problem}")
                if not quiet:
                    warn(f"{shard.source}: {problem}")
            order.extend(found)
            yield from found

    alternatives, clip = options.num_captions > 1, options.rerank is not None
    failed = done = 0
    start = time.perf_counter()
    target = out.AtomicFile(output) if output else contextlib.nullcontext(sys.stdout)
    with target as stream, ui.item_progress("embeddings", quiet) as progress, OffThread() as background:
        writer = out.get_writer(fmt, stream, settings=f"model {model_args['name_or_path']}, {options.search}")
        task = progress.add_task("captioning", total=None)
        pending: list[dict] = []
        for captioned in captioner.stream(
            samples(), options, batch_size=batch_size, workers=0, seed_id=seed_id, group_of=lambda s: s.shard
        ):
            sample = order.popleft()
            record = make_record(sample, captioned, alternatives, clip)
            if record["error"] is not None:
                failed += 1
                if not quiet:
                    warn(f"{sample.key}: {record['error']}")
            pending.append(record)
            done += 1
            progress.advance(task)
            if len(pending) >= (batch_size or 64):
                background.submit(writer.write, pending)
                pending = []
        background.submit(writer.write, pending)
        background.submit(writer.close)
    if not quiet:
        seconds = time.perf_counter() - start
        summary = (
            f"captioned {done - failed} of {done} embeddings from {len(shards)} files in {seconds:.1f} s "
            f"({(done - failed) / max(seconds, 1e-9):.2f} images/s)"
        )
        if output:
            summary += f"; wrote {output}"
        if problems:
            summary += f"; [red]{len(problems)} unreadable files[/]"
        stderr.print(summary + (f"; [red]{failed} failed[/]" if failed else ""), highlight=False)
    return failed + len(problems)
