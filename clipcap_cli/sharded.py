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
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import check_folder, publish, write_text_atomic
from clipcap_cli.inputs import WORKERS, check_loading
from clipcap_cli.records import caption_fields, dumps
from clipcap_cli.shards import SHARD_SIZE, Sample, Shard, check_shard, keys_sha256, mine, seed_id, shard_samples
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    from clipcap_cli.captioner import Captioned, Captioner
    from clipcap_cli.decoding import DecodingOptions
    from clipcap_cli.distributed import Distributed

FORMAT = "clipcap-captions"
FORMAT_VERSION = 1
OUTPUT_FORMATS: tuple[str, ...] = ("jsonl", "parquet")
SETTINGS_FILE = "_settings.json"
SUMMARY_FILE = "_summary.json"
PART = ".part"
EMBEDDINGS_KEY = "embeddings"
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


class OffThread:
    """Runs calls in order on one thread, so that writing output never holds up the model."""

    def __init__(self, backlog: int = 256):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clipcap-writer")
        self._pending: collections.deque[Any] = collections.deque()
        self._backlog = backlog  # beyond this many queued calls, the caller waits (bounded memory)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (self._pending[0].done() or len(self._pending) > self._backlog):
            self._pending.popleft().result()  # a failed write raises here, at once

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> OffThread:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- settings


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_settings(out: Path, settings: dict) -> bool:
    """Refuse, in one line, to add to ``out`` with settings other than those recorded there.
    Returns whether ``out`` already records settings."""
    file = out / SETTINGS_FILE
    if not file.is_file():
        return False
    try:
        old = json.loads(file.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{file} is unreadable ({exc}): remove it only if {out} holds nothing you want to keep"
        ) from None
    before, now = _flat(old), _flat(json.loads(json.dumps(settings)))
    if "weights" not in old:  # a folder started before weights were fingerprinted: names only, as then
        now = {k: v for k, v in now.items() if not k.startswith("weights.")}
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    weights = [k for k in changed if k.startswith("weights.")]
    if weights:
        what = ", ".join(
            f"the {k.removeprefix('weights.')} ({str(before.get(k))[:12]}... then, {str(now.get(k))[:12]}... now)"
            for k in weights
        )
        raise UsageError(
            f"the weights changed since {out} was started: {what} (sha256): caption with the weights "
            "it was started with, or use another --output-dir"
        )
    diffs = [f"{k} {before.get(k)!r} then, {now.get(k)!r} now" for k in changed]
    if diffs:
        raise UsageError(
            f"{out} holds captions made with other settings ({'; '.join(diffs)}): "
            "rerun with the same options, or use another --output-dir"
        )
    return True


def write_settings(out: Path, settings: dict) -> None:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "clipcap_version": __version__, "settings": settings}
    write_text_atomic(out / SETTINGS_FILE, dumps(doc, indent=2) + "\n")


def read_stats(opts: ShardedOptions, name: str) -> dict | None:
    """A finished shard's stats, or None (not finished, or a torn file: then it is redone)."""
    try:
        return json.loads(opts.stats_file(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- records on disk


def make_record(sample: Sample, out: Captioned, alternatives: bool, clip: bool) -> dict[str, Any]:
    """A sample's record: key, shard, the caption fields of every record (``records.caption_fields``),
    then what the shard carries (url, source_caption)."""
    record: dict[str, Any] = {
        "key": sample.key,
        "shard": sample.shard,
        **caption_fields(out.result, out.error, alternatives=alternatives, clip=clip),
    }
    record.update(out.info or {})
    return record


def _parquet_table(records: list[dict], alternatives: bool, clip: bool) -> Any:
    """One Parquet schema for every shard of a run: the record's fields, typed."""
    import pyarrow as pa

    columns = [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("error", pa.string()),
    ]
    if clip:
        columns.append(("clip_score", pa.float64()))
    if alternatives:
        columns += [("captions", pa.list_(pa.string())), ("scores", pa.list_(pa.float64()))]
        if clip:
            columns.append(("clip_scores", pa.list_(pa.float64())))
    columns += [("url", pa.string()), ("source_caption", pa.string())]
    return pa.Table.from_pylist(records, schema=pa.schema(columns))


def read_records(opts: ShardedOptions, name: str) -> list[dict]:
    """The records of a finished shard, in order (JSON Lines or Parquet, as written)."""
    path = opts.records_file(name)
    if opts.output_format == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save_embeddings(path: Path, rows: list[Any], dim: int, dtype: Any) -> None:
    """``rows`` (D,) tensors or None (failed: a NaN row) -> ``path``, through ``path.part``."""
    import torch
    from safetensors.torch import save_file

    nan = torch.full((dim,), float("nan"))
    emb = torch.stack([r if r is not None else nan for r in rows]) if rows else torch.empty(0, dim)
    part = path.with_name(path.name + PART)
    save_file(
        {EMBEDDINGS_KEY: emb.to(dtype).contiguous()}, str(part), metadata={"format": FORMAT, "rows": str(len(rows))}
    )
    publish(part, path)


def load_embeddings(path: str | Path) -> Any:
    """The (N, D) embeddings of ``NAME.emb.safetensors`` (row i <-> record i; NaN rows failed)."""
    from safetensors.torch import load_file

    return load_file(str(path))[EMBEDDINGS_KEY]


# --------------------------------------------------------------------------- one shard's output


@dataclass
class _Job:
    """One shard being written (new) or patched (retry); its methods run on the writer thread."""

    shard: Shard
    opts: ShardedOptions
    context: dict  # settings, embedding size and dtype, device, process, error log
    retry: frozenset[str] | None = None  # retry: the keys to re-caption
    expected: int = 0  # samples to receive
    received: int = 0
    problem: str | None = None  # why the shard could not be read to its end
    started: float = field(default_factory=time.perf_counter)
    buffer: list = field(default_factory=list)  # (record, embedding) not yet handed to the writer
    records: list = field(default_factory=list)  # writer side: parquet records, retried records
    rows: list = field(default_factory=list)  # writer side: embeddings
    lines: Any = None  # writer side: the open NAME.jsonl.part

    @property
    def name(self) -> str:
        return self.shard.name

    def open(self) -> None:
        """Start the shard afresh: whatever an interrupted run left of it goes."""
        for path in (
            self.opts.records_file(self.name),
            self.opts.embeddings_file(self.name),
            self.opts.errors_file(self.name),
        ):
            path.unlink(missing_ok=True)
            path.with_name(path.name + PART).unlink(missing_ok=True)
        if self.opts.output_format == "jsonl":
            part = self.opts.records_file(self.name)
            self.lines = open(part.with_name(part.name + PART), "w", encoding="utf-8")

    def add(self, batch: list[tuple[dict, Any]]) -> None:
        for record, embedding in batch:
            if self.lines is not None and self.retry is None:
                self.lines.write(dumps(record) + "\n")
            else:
                self.records.append(record)
            self.rows.append(embedding)

    def finish(self) -> None:
        if self.retry is not None:
            return self._patch()
        records_file = self.opts.records_file(self.name)
        part = records_file.with_name(records_file.name + PART)
        if self.lines is not None:
            self.lines.close()
        else:
            import pyarrow.parquet as pq

            pq.write_table(_parquet_table(self.records, self.context["alternatives"], self.context["clip"]), str(part))
        publish(part, records_file)
        if self.opts.save_embeddings:
            _save_embeddings(
                self.opts.embeddings_file(self.name), self.rows, self.context["dim"], self.context["dtype"]
            )
        self._write_stats(read_records(self.opts, self.name), time.perf_counter() - self.started)

    def _patch(self) -> None:
        """Retry: put the new records (and embedding rows) in place of the failed ones."""
        new = {r["key"]: (r, e) for r, e in zip(self.records, self.rows)}
        old_stats = read_stats(self.opts, self.name) or {}
        records_file = self.opts.records_file(self.name)
        part = records_file.with_name(records_file.name + PART)
        if self.opts.output_format == "jsonl":
            lines = records_file.read_text(encoding="utf-8").splitlines(keepends=True)
            keys = [json.loads(line)["key"] for line in lines]
            # untouched records keep their exact bytes
            part.write_text(
                "".join(dumps(new[k][0]) + "\n" if k in new else line for k, line in zip(keys, lines)), encoding="utf-8"
            )
        else:
            import pyarrow.parquet as pq

            records = [new[r["key"]][0] if r["key"] in new else r for r in read_records(self.opts, self.name)]
            keys = [r["key"] for r in records]
            pq.write_table(_parquet_table(records, self.context["alternatives"], self.context["clip"]), str(part))
        emb_part = None
        if self.opts.save_embeddings:
            emb_file = self.opts.embeddings_file(self.name)
            old = load_embeddings(emb_file) if emb_file.is_file() else None
            rows = [new[k][1] if k in new else (old[i] if old is not None else None) for i, k in enumerate(keys)]
            emb_part = emb_file.with_name(emb_file.name + ".new")
            _save_embeddings(emb_part, rows, self.context["dim"], self.context["dtype"])
        # Without stats the shard counts as unfinished: a crash from here on redoes it whole.
        self.opts.stats_file(self.name).unlink(missing_ok=True)
        publish(part, records_file)
        if emb_part is not None:
            publish(emb_part, self.opts.embeddings_file(self.name))
        seconds = float(old_stats.get("seconds") or 0.0) + time.perf_counter() - self.started
        self._write_stats(read_records(self.opts, self.name), seconds, retried=len(new))

    def _write_stats(self, records: list[dict], seconds: float, retried: int = 0) -> None:
        """NAME.errors.log (the shard's failed samples, from its records), then NAME.stats.json: done."""
        failed = sum(r["error"] is not None for r in records)
        self._write_errors(records)
        stats = {
            "shard": self.name,
            "source": self.shard.source,
            "records": self.opts.records_file(self.name).name,
            "embeddings": self.opts.embeddings_file(self.name).name if self.opts.save_embeddings else None,
            "samples": len(records),
            "ok": len(records) - failed,
            "failed": failed,
            "error": self.problem,
            "retried": retried,
            "seconds": round(seconds, 3),
            "keys_sha256": keys_sha256(r["key"] for r in records),
            "settings": self.context["settings"],
            "device": self.context["device"],
            "process": self.context["process"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "clipcap_version": __version__,
        }
        part = self.opts.stats_file(self.name).with_name(self.opts.stats_file(self.name).name + PART)
        part.write_text(dumps(stats, indent=2) + "\n", encoding="utf-8")
        publish(part, self.opts.stats_file(self.name))

    def _write_errors(self, records: list[dict]) -> None:
        """One line per failed sample (key, error), or no file when none failed: derived from the
        shard's final records, so an interrupted and resumed run leaves the same file as one that was not."""
        path = self.opts.errors_file(self.name)
        lines = [f"{r['key']}\t{' '.join(str(r['error']).split())}\n" for r in records if r["error"] is not None]
        if self.problem:
            lines.append(f"(shard)\t{' '.join(self.problem.split())}\n")
        if not lines:
            path.unlink(missing_ok=True)
            return
        part = path.with_name(path.name + PART)
        part.write_text("".join(lines), encoding="utf-8")
        publish(part, path)


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
    from clipcap_cli.backbones import clip_dtype

    context = {
        "settings": settings,
        "alternatives": decoding.num_captions > 1,
        "clip": decoding.rerank is not None,
        "dim": captioner.config.prefix_size,
        "dtype": clip_dtype(captioner.device),
        "device": str(captioner.device),
        "process": {"slot": int(slot), "shard": f"{opts.shard[0]}/{opts.shard[1]}"},
    }
    jobs: dict[str, _Job] = {}
    order: collections.deque[Sample] = collections.deque()  # samples in stream order
    failed = 0
    with OffThread() as writer:

        def samples() -> Iterator[Sample]:  # runs in this thread, as the loader asks for more work
            for shard, keys in [(s, None) for s in work.todo] + work.retry:
                found, problem = shard_samples(shard)
                if keys is not None:
                    found = [s for s in found if s.key in keys]
                job = jobs[shard.name] = _Job(shard, opts, context, keys, len(found), problem=problem)
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


def _finish(job: _Job, writer: OffThread, counts: Any) -> None:
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
