"""The files of `clipcap caption --output-dir DIR` (see ``sharded``): each shard's records (JSON Lines or
Parquet), embeddings, stats and error log, written as ``FILE.part`` and renamed; the folder's ``_settings.json``;
and the writer thread that keeps all this writing off the model's way.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.batch.shards import Sample, Shard, keys_sha256
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import publish, write_text_atomic
from clipcap_cli.records import caption_fields, dumps
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    from clipcap_cli.batch.sharded import ShardedOptions
    from clipcap_cli.captioner import Captioned

FORMAT = "clipcap-captions"
FORMAT_VERSION = 1
OUTPUT_FORMATS: tuple[str, ...] = ("jsonl", "parquet")
SETTINGS_FILE = "_settings.json"
SUMMARY_FILE = "_summary.json"
PART = ".part"
EMBEDDINGS_KEY = "embeddings"


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


def parquet_table(records: list[dict], alternatives: bool, clip: bool) -> Any:
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


def save_embeddings(path: Path, rows: list[Any], dim: int, dtype: Any) -> None:
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
class ShardJob:
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

            pq.write_table(parquet_table(self.records, self.context["alternatives"], self.context["clip"]), str(part))
        publish(part, records_file)
        if self.opts.save_embeddings:
            save_embeddings(self.opts.embeddings_file(self.name), self.rows, self.context["dim"], self.context["dtype"])
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
            pq.write_table(parquet_table(records, self.context["alternatives"], self.context["clip"]), str(part))
        emb_part = None
        if self.opts.save_embeddings:
            emb_file = self.opts.embeddings_file(self.name)
            old = load_embeddings(emb_file) if emb_file.is_file() else None
            rows = [new[k][1] if k in new else (old[i] if old is not None else None) for i, k in enumerate(keys)]
            emb_part = emb_file.with_name(emb_file.name + ".new")
            save_embeddings(emb_part, rows, self.context["dim"], self.context["dtype"])
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
