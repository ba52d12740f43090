"""Hostile servers: an image URL that trickles bytes, stalls after its headers or mid-body is cut off
by its total deadline with an error record while the other images go on; downloads of checkpoints
fail within a bounded time on a stalled or trickling transfer and say how to resume."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from conftest import make_images
from test_download import PAYLOAD, SHA, dest, server  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.data.inputs import InputError, fetch_url
from clipcap_cli.weights import download as dl
from clipcap_cli.weights.download_errors import TooSlowError, TransferError

runner = CliRunner()


class _Hostile(http.server.BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        kind = self.path.strip("/").split(".")[0]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            if kind == "fine":
                self.wfile.write(self.body)
            elif kind == "trickle":  # a byte every 0.2 s: the gaps are short, the whole is endless
                for b in self.body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)
            elif kind == "stall":  # headers, then nothing
                time.sleep(30)
            elif kind == "midway":  # half the body, then nothing
                self.wfile.write(self.body[: len(self.body) // 2])
                self.wfile.flush()
                time.sleep(30)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    pics = make_images(tmp_path_factory.mktemp("web"))
    _Hostile.body = pics["rgb"].read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("CLIPCAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("kind", ["trickle", "stall", "midway"])
def test_a_slow_url_is_cut_off_at_its_deadline(hostile, online, kind):
    start = time.monotonic()
    with pytest.raises(InputError, match="took longer than 1.5 s"):
        fetch_url(f"{hostile}/{kind}.jpg", deadline=1.5)
    assert time.monotonic() - start < 10  # the server would take 30 s or more


def test_a_fine_url_within_the_deadline(hostile, online):
    assert fetch_url(f"{hostile}/fine.jpg", deadline=5) == _Hostile.body


def test_caption_gives_the_slow_url_an_error_record_and_goes_on(hostile, online, tiny_checkpoint, tmp_path):
    local = make_images(tmp_path / "local")["gray"]
    urls = [f"{hostile}/trickle.jpg", f"{hostile}/fine.jpg", f"{hostile}/stall.jpg"]
    result = runner.invoke(
        app,
        [
            "caption",
            "--model",
            str(tiny_checkpoint),
            "--max-length",
            "5",
            "--url-timeout",
            "1.5",
            *urls,
            str(local),
            "--format",
            "jsonl",
            "-q",
        ],
    )
    assert result.exit_code == 3, result.output
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert "took longer than 1.5 s" in records[urls[0]]["error"] and "took longer" in records[urls[2]]["error"]
    assert records[urls[1]]["error"] is None and records[str(local)]["error"] is None


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_url_timeout_must_be_a_finite_positive_number(tiny_checkpoint, value, tmp_path):
    result = runner.invoke(app, ["caption", "--model", str(tiny_checkpoint), "--url-timeout", value, str(tmp_path)])
    assert result.exit_code == 2 and "--url-timeout must be a finite number > 0" in result.stderr


# --------------------------------------------------------------------------- checkpoint downloads


def _trickle(handler, query) -> None:
    """The payload from the requested offset, a few bytes every 50 ms: never a gap, never done."""
    rng = handler.headers.get("Range")
    start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
    body = PAYLOAD[start:]
    handler.send_response(206 if start else 200)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        for i in range(0, len(body), 64):
            handler.wfile.write(body[i : i + 64])
            handler.wfile.flush()
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_a_trickling_download_stops_in_bounded_time_and_says_how_to_resume(server, dest):
    server.routes["/slow"] = _trickle
    start = time.monotonic()
    with pytest.raises(TooSlowError) as exc:
        dl.fetch([server.url("/slow")], dest, timeout=5.0, retries=3, backoff=0.01, min_rate=100_000, rate_window=1.0)
    assert time.monotonic() - start < 10  # the whole file would take 20 minutes at this pace
    message = str(exc.value)
    assert "transfer too slow" in message and "run the same command again to resume" in message
    part = dest.with_name(dest.name + ".part")
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and not dest.exists()
    assert part.read_bytes() == PAYLOAD[:kept]
    # The next run resumes from what was kept (here from a server that is fast again).
    assert dl.fetch([server.url()], dest, sha256=SHA, timeout=5.0, retries=1, backoff=0.01) == dest
    assert dest.read_bytes() == PAYLOAD
    assert server.hits()[-1]["range"] == f"bytes={kept}-"


def test_a_stall_mid_body_fails_within_the_retries(server, dest):
    server.faults.extend(["drop:1000", "sleep:3", "sleep:3"])
    start = time.monotonic()
    with pytest.raises(TransferError, match="giving up"):
        dl.fetch([server.url()], dest, timeout=0.5, retries=1, backoff=0.01)
    assert time.monotonic() - start < 10


def test_a_fast_download_is_not_slowed_by_the_rule(server, dest):
    assert dl.fetch([server.url()], dest, sha256=SHA, timeout=5.0, min_rate=1024, rate_window=0.05) == dest
    assert dest.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- the cached registry files


def _planted_model(tmp_path, monkeypatch):
    """A registry model 'coco' whose checkpoint is a cached file with a verified record."""
    import hashlib

    from clipcap_cli.weights import registry as pretrained

    model = pretrained.REGISTRY["coco"]
    model.path.parent.mkdir(parents=True, exist_ok=True)
    model.path.write_bytes(b"released weights" * 1000)
    digest = hashlib.sha256(model.path.read_bytes()).hexdigest()
    pretrained._write_record(model, digest, "huggingface.co")
    return pretrained, model


def test_a_cached_model_whose_bytes_changed_is_refused_with_what_to_do(tmp_path, monkeypatch):
    pretrained, model = _planted_model(tmp_path, monkeypatch)
    assert pretrained.resolve("coco")[0] == model.path  # unchanged: used
    data = bytearray(model.path.read_bytes())
    data[10] ^= 0xFF  # same size, other bytes (bit rot, a partial overwrite)
    model.path.write_bytes(bytes(data))
    with pytest.raises(
        pretrained.ModelNotAvailableError, match="no longer matches the sha256 .*clipcap download --force coco"
    ):
        pretrained.resolve("coco")
    result = runner.invoke(app, ["download", "coco", "--no-backbones"])
    assert result.exit_code == 1 and "clipcap download --force coco" in result.stderr


def test_a_touched_but_unchanged_model_is_rehashed_once_and_used(tmp_path, monkeypatch):
    import os

    from clipcap_cli import fsutil

    pretrained, model = _planted_model(tmp_path, monkeypatch)
    os.utime(model.path, ns=(1, 1))
    calls = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert pretrained.resolve("coco")[0] == model.path
    assert pretrained.resolve("coco")[0] == model.path
    assert len(calls) == 1  # the renewed record makes the second check cheap
