"""Hostile servers: an image URL that trickles bytes, stalls after its headers or mid-body is cut off
by its total deadline with an error record while the other images go on; downloads of checkpoints
fail within a bounded time on a stalled or trickling transfer and say how to resume."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipcap_cli.cli import app
from clipcap_cli.inputs import InputError, fetch_url
from conftest import make_images

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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


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
    result = runner.invoke(app, ["caption", "--model", str(tiny_checkpoint), "--max-length", "5", "--url-timeout", "1.5",
                                 *urls, str(local), "--format", "jsonl", "-q"])
    assert result.exit_code == 3, result.output
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert "took longer than 1.5 s" in records[urls[0]]["error"] and "took longer" in records[urls[2]]["error"]
    assert records[urls[1]]["error"] is None and records[str(local)]["error"] is None


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_url_timeout_must_be_a_finite_positive_number(tiny_checkpoint, value, tmp_path):
    result = runner.invoke(app, ["caption", "--model", str(tiny_checkpoint), "--url-timeout", value, str(tmp_path)])
    assert result.exit_code == 2 and "url deadline must be a finite number > 0" in result.stderr
