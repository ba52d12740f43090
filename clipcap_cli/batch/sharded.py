"""Sharded, resumable captioning into sidecar files: what `clipcap caption ... --output-dir DIR` runs.

For each input shard NAME (``shards.py``) the output folder gets::

    NAME.jsonl             one record per sample: key, shard, caption, score, error (+ url,
                           source_caption when the shard has them; captions, scores with -n)
    NAME.parquet           the same records instead, with --output-format parquet
    NAME.emb.safetensors   --save-embeddings: "embeddings" (N, D), row i <-> record i (NaN rows
                           for failed samples), CLIP's own dtype (fp16 on CUDA, as extract)
    NAME.stats.json        written last: counts, seconds, settings; its presence means "done"

and ``NAME.errors.log`` (key and error of each failed sample, derived from the records, so that an
interrupted and resumed run leaves the same file), ``_settings.json`` (what every shard must share,
the weights' sha256 included) and ``_summary.json`` (written at the end). Files are written as
``FILE.part`` and renamed, so a killed run leaves finished shards whole; the same command then
skips them and redoes the rest. Shard i goes to process i mod P, where P counts torchrun's
processes times ``--shard``'s n; torch.distributed only sums progress counts and waits at the end.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from clipcap_cli.batch.sharded_output import (
    FORMAT,
    OUTPUT_FORMATS,
    SUMMARY_FILE,
    OffThread,
    ShardJob,
    check_settings,
    make_record,
    read_records,
    read_stats,
    write_settings,
)
from clipcap_cli.batch.shards import SHARD_SIZE, Sample, Shard, check_shard, mine, seed_id, shard_samples
from clipcap_cli.data.inputs import WORKERS, check_loading
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import check_folder, write_text_atomic
from clipcap_cli.records import dumps
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    from clipcap_cli.captioner import Captioner
    from clipcap_cli.decoding.decode import DecodingOptions
    from clipcap_cli.distributed import Distributed

FLUSH_EVERY = 64  # records handed to the writer thread at a time


@dataclass(frozen=True)
class ShardedOptions:
    """How `clipcap caption --output-dir` runs. The CLI takes its defaults from here."""

    output_dir: Path  # where the sidecar files go
    output_format: str = "jsonl"  # jsonl, or parquet (needs pyarrow: the `parquet` extra)
    save_embeddings: bool = False  # also NAME.emb.safetensors, rows aligned with the records
    retry_failed: bool = False  # re-caption the failed samples of finished shards
    shard_size: int = SHARD_SIZE  # images per shard cut from a list of images
    shard: tuple[int, int] = (0, 1)  # (i, n): this process takes shards s with s % n == i
    batch_size: int | None = None  # images per CLIP + decoding batch; None = decoding.default_batch_size
    workers: int | None = WORKERS  # image-decoding processes; None = inputs.default_workers

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(
                f"unknown --output-format {self.output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}"
            )
        if self.output_format == "parquet":
            import importlib.util

            if importlib.util.find_spec("pyarrow") is None:
                raise UsageError(
                    "--output-format parquet needs pyarrow: pip install pyarrow (the clipcap-cli parquet extra)"
                )
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, got {self.shard_size}")
        check_loading(self.batch_size, self.workers)
        check_folder(self.output_dir, "--output-dir")
        check_shard(*self.shard)

    def records_file(self, name: str) -> Path:
        return self.output_dir / f"{name}.{self.output_format}"

    def embeddings_file(self, name: str) -> Path:
        return self.output_dir / f"{name}.emb.safetensors"

    def stats_file(self, name: str) -> Path:
        return self.output_dir / f"{name}.stats.json"

    def errors_file(self, name: str) -> Path:
        return self.output_dir / f"{name}.errors.log"


class Progress(NamedTuple):
    """Counts of the whole job (every process) for this run, for a progress bar."""

    samples: int  # samples captioned or failed so far
    failed: int
    shards_done: int
    shards: int  # shards this run works on (new, partial, or with samples to retry)
    expected: int  # samples expected this run: counted in the shards read so far, estimated for the rest


# Counters summed across processes (distributed.GlobalCounts), by position.
_SAMPLES, _FAILED, _SHARDS_DONE, _SHARDS, _KNOWN, _READ, _SKIPPED, _RETRIED = range(8)


# --------------------------------------------------------------------------- the run


@dataclass
class Plan:
    """This process's share of the job."""

    todo: list[Shard] = field(default_factory=list)  # new or partial shards, done from the start
    retry: list[tuple[Shard, frozenset[str]]] = field(default_factory=list)  # finished shards: keys to retry
    skipped: int = 0  # finished shards left alone
    failed_before: int = 0  # failed samples in the finished shards left alone


def plan(shards: Sequence[Shard], opts: ShardedOptions, slot: int, slots: int) -> Plan:
    """Sort this process's shards into finished, to redo, and to patch (``--retry-failed``)."""
    p = Plan()
    for shard in mine(shards, slot, slots):
        stats = read_stats(opts, shard.name)
        if stats is None or (opts.retry_failed and stats.get("error")):
            p.todo.append(shard)  # new, partial, or (retrying) not read to its end last time
            continue
        expected = shard.list_keys_sha256()
        if expected is not None and stats.get("keys_sha256") != expected:
            raise UsageError(
                f"the inputs changed since {opts.output_dir} was written: shard {shard.name} held other "
                "images then; use another --output-dir (or the same inputs and --shard-size)"
            )
        failed = (
            frozenset(r["key"] for r in read_records(opts, shard.name) if r["error"] is not None)
            if opts.retry_failed and stats.get("failed")
            else frozenset()
        )
        if failed:
            p.retry.append((shard, failed))
        else:
            p.skipped += 1
            p.failed_before += int(stats.get("failed") or 0) + bool(stats.get("error"))
    return p


@dataclass
class Outcome:
    """What `run` did, and where the whole output folder stands."""

    summary: dict  # what _summary.json holds
    failed_here: int  # failed samples (and unreadable shards) among this process's shards


def run(
    shards: Sequence[Shard],
    load: Callable[[], Captioner],
    decoding: DecodingOptions,
    settings: dict,
    opts: ShardedOptions,
    *,
    dist: Distributed | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Outcome:
    """Caption this process's shards into ``opts.output_dir``; see the module docstring.

    Args:
        shards: the whole job's shards (``shards.discover``), the same list in every process.
        load: returns the captioner; called only when this process has work.
        decoding: decoding options.
        settings: what the output folder records and every later run must match (model, decoding, ...).
        opts: output folder, format, sharding and batching.
        dist: the torchrun job (None: a single process).
        on_progress: called with the job's counts (every process's, under torchrun) as they change.
    """
    from clipcap_cli.distributed import GlobalCounts

    start = time.perf_counter()
    out = opts.output_dir
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    i, n = opts.shard
    slot, slots = i * world + rank, n * world
    out.mkdir(parents=True, exist_ok=True)
    recorded = check_settings(out, settings)  # every process checks before any writes: all refuse alike
    if not recorded and rank == 0:
        write_settings(out, settings)
    if dist is not None:
        dist.barrier()
    work = plan(shards, opts, slot, slots)

    def report(totals: list[int]) -> None:
        if on_progress is not None:
            known, read, planned = totals[_KNOWN], totals[_READ], totals[_SHARDS]
            estimate = known + (planned - read) * known // read if read else 0
            on_progress(
                Progress(
                    totals[_SAMPLES], totals[_FAILED], totals[_SHARDS_DONE], planned, max(estimate, totals[_SAMPLES])
                )
            )

    captioner = load() if work.todo or work.retry else None  # before the first count: no bar while loading
    counts = GlobalCounts(dist, 8, report)
    counts.add(_SHARDS, len(work.todo) + len(work.retry))
    counts.add(_SKIPPED, work.skipped)
    failed_here = work.failed_before
    try:
        if captioner is not None:
            failed_here += _caption(captioner, work, decoding, settings, opts, counts, f"{slot}")
    finally:
        totals = counts.close()  # under torchrun: waits for every process
    this_run = {
        "samples": totals[_SAMPLES],
        "failed": totals[_FAILED],
        "shards_done": totals[_SHARDS_DONE],
        "shards_skipped": totals[_SKIPPED],
        "retried": totals[_RETRIED],
        "seconds": round(time.perf_counter() - start, 3),
        "processes": slots,
    }
    summary = summarize(shards, opts, settings, this_run)
    if rank == 0:  # torchrun: rank 0 once all are done; --shard i/n: each process (the last one sees all)
        write_text_atomic(out / SUMMARY_FILE, dumps(summary, indent=2) + "\n")
    return Outcome(summary, failed_here)


def _caption(
    captioner: Captioner,
    work: Plan,
    decoding: DecodingOptions,
    settings: dict,
    opts: ShardedOptions,
    counts: Any,
    slot: str,
) -> int:
    """Stream every pending sample through the captioner; returns the failures among them."""
    from clipcap_cli.weights.clip_tower import clip_dtype

    context = {
        "settings": settings,
        "alternatives": decoding.num_captions > 1,
        "clip": decoding.rerank is not None,
        "dim": captioner.config.prefix_size,
        "dtype": clip_dtype(captioner.device),
        "device": str(captioner.device),
        "process": {"slot": int(slot), "shard": f"{opts.shard[0]}/{opts.shard[1]}"},
    }
    jobs: dict[str, ShardJob] = {}
    order: collections.deque[Sample] = collections.deque()  # samples in stream order
    failed = 0
    with OffThread() as writer:

        def samples() -> Iterator[Sample]:  # runs in this thread, as the loader asks for more work
            for shard, keys in [(s, None) for s in work.todo] + work.retry:
                found, problem = shard_samples(shard)
                if keys is not None:
                    found = [s for s in found if s.key in keys]
                job = jobs[shard.name] = ShardJob(shard, opts, context, keys, len(found), problem=problem)
                counts.add(_READ)
                counts.add(_KNOWN, len(found))
                if keys is None:
                    writer.submit(job.open)
                if not found:
                    _finish(job, writer, counts)
                order.extend(found)
                yield from found

        for captioned in captioner.stream(
            samples(),
            decoding,
            batch_size=opts.batch_size,
            workers=opts.workers,
            embeddings=opts.save_embeddings,
            seed_id=seed_id,
            group_of=lambda s: s.shard,
        ):
            sample = order.popleft()
            job = jobs[sample.shard]
            record = make_record(sample, captioned, context["alternatives"], context["clip"])
            job.buffer.append((record, captioned.embedding))
            job.received += 1
            counts.add(_SAMPLES)
            if job.retry is not None:
                counts.add(_RETRIED)
            if record["error"] is not None:
                counts.add(_FAILED)
                failed += 1
            if job.received == job.expected:
                _finish(job, writer, counts)
            elif len(job.buffer) >= FLUSH_EVERY:
                writer.submit(job.add, job.buffer)
                job.buffer = []
    return failed + sum(job.problem is not None for job in jobs.values())


def _finish(job: ShardJob, writer: OffThread, counts: Any) -> None:
    writer.submit(job.add, job.buffer)
    job.buffer = []
    writer.submit(job.finish)
    counts.add(_SHARDS_DONE)


def summarize(shards: Sequence[Shard], opts: ShardedOptions, settings: dict, this_run: dict) -> dict:
    """The whole output folder's state, from the stats files of the job's shards."""
    done = samples = ok = failed = 0
    missing, problems = [], []
    for shard in shards:
        stats = read_stats(opts, shard.name)
        if stats is None:
            missing.append(shard.name)
            continue
        done += 1
        samples += int(stats.get("samples", 0))
        ok += int(stats.get("ok", 0))
        failed += int(stats.get("failed", 0))
        if stats.get("error"):
            problems.append({"shard": shard.name, "error": stats["error"]})
    return {
        "format": FORMAT,
        "complete": not missing,
        "shards": len(shards),
        "shards_done": done,
        "shards_missing": missing[:100],
        "samples": samples,
        "ok": ok,
        "failed": failed,
        "unreadable_shards": problems,
        "this_run": this_run,
        "output_format": opts.output_format,
        "embeddings": opts.save_embeddings,
        "error_logs": sorted(p.name for p in opts.output_dir.glob("*.errors.log")),
        "settings": settings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clipcap_version": __version__,
    }
