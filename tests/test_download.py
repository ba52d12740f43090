"""Tests for clipcap_cli.weights.download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from clipcap_cli.fsutil import sha256_file
from clipcap_cli.weights import download_hosts
from clipcap_cli.weights.download import fetch
from clipcap_cli.weights.download_errors import (
    BadContentError,
    ChecksumError,
    HTTPStatusError,
    LockTimeoutError,
    NotEnoughSpaceError,
    OfflineError,
    TransferError,
)

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # 3 MiB and change: several 1 MiB chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 3, "backoff": 0.01, "timeout": 5.0}  # tiny backoff keeps tests quick

Route = Callable[["Handler", dict[str, list[str]]], None]


@dataclass
class Server:
    """State shared with the handler: scripted faults for /file and a request log."""

    base: str
    payload: bytes = PAYLOAD
    faults: deque[str] = field(default_factory=deque)  # consumed one per /file request
    routes: dict[str, Route] = field(default_factory=dict)
    log: list[dict[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/file") -> str:
        return self.base + path

    def hits(self, path: str = "/file") -> list[dict[str, str | None]]:
        return [r for r in self.log if r["path"] == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: Server  # set per server via a subclass

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        st = self.state
        with st.lock:
            st.log.append(
                {
                    "path": parts.path,
                    "range": self.headers.get("Range"),
                    "ua": self.headers.get("User-Agent"),
                    "query": parts.query,
                }
            )
            fault = st.faults.popleft() if parts.path == "/file" and st.faults else ""
        route = st.routes.get(parts.path)
        if route is not None:
            route(self, parse_qs(parts.query))
        elif parts.path == "/file":
            self.serve_payload(fault)
        else:
            self.send_simple(404, b"not found")

    def send_simple(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def serve_payload(self, fault: str = "", payload: bytes | None = None) -> None:
        """Serve the payload with Range support; ``fault`` injects one misbehaviour."""
        data = self.state.payload if payload is None else payload
        kind, _, arg = fault.partition(":")
        if kind == "status":
            self.send_simple(int(arg), b"fault")
            return
        if kind == "sleep":  # stall before answering: trips the client's read timeout
            time.sleep(float(arg))
        start = 0
        rng = self.headers.get("Range")
        if rng and kind != "ignore_range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "drop":  # promise everything, send N bytes, hang up
            self.wfile.write(body[: int(arg)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "slowbody":  # spread the body over time so concurrent clients overlap
            step = len(body) // 10 + 1
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                time.sleep(float(arg) / 10)
            return
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on purpose (timeouts) are not test failures


@pytest.fixture
def server() -> Iterator[Server]:
    handler = type("BoundHandler", (Handler,), {})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    state = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    handler.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "models" / "coco.pt"


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------- basics


def test_plain_download_reports_progress_and_verifies(server: Server, dest: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    out = fetch(
        [server.url()],
        dest,
        sha256=SHA,
        size=len(PAYLOAD),
        progress=lambda d, t: calls.append((d, t)),
        **FAST,
    )
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()
    assert calls[0] == (0, len(PAYLOAD)) and calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # monotonic here
    assert len(calls) >= 4  # 1 MiB chunks
    (req,) = server.hits()
    assert req["range"] is None and req["ua"].startswith("clipcap-cli/")


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(PAYLOAD)
    assert sha256_file(p, chunk=4096) == SHA


def test_network_probe(server: Server) -> None:
    from clipcap_cli.paths import network_reachable

    probe = network_reachable.__wrapped__  # uncached
    port = int(server.base.rsplit(":", 1)[1])
    assert probe("127.0.0.1", port, timeout=1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    assert not probe("127.0.0.1", free_port, timeout=1.0)


# --------------------------------------------------------------------------- resume / retry


def test_dropped_connection_resumes_with_range(server: Server, dest: Path) -> None:
    cut = 1_500_000
    server.faults.append(f"drop:{cut}")
    fetch([server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = server.hits()
    assert first["range"] is None
    # The client kept what it got (at least the first full 1 MiB chunk) and resumed.
    start = int(second["range"].removeprefix("bytes=").rstrip("-"))
    assert 1 << 20 <= start <= cut


def test_server_ignoring_range_restarts_from_zero(server: Server, dest: Path) -> None:
    server.faults.extend(["drop:1500000", "ignore_range"])
    seen: list[int] = []
    fetch([server.url()], dest, sha256=SHA, progress=lambda d, t: seen.append(d), **FAST)
    assert dest.read_bytes() == PAYLOAD  # not the 1 MiB prefix twice
    assert server.hits()[1]["range"] is not None
    assert 0 in seen[1:]  # progress went back to zero on the restart


def test_complete_part_answered_416_is_finalized(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(PAYLOAD)
    fetch([server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits()[0]["range"] == f"bytes={len(PAYLOAD)}-"


def test_stale_part_from_other_file_is_redone_from_scratch(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(b"x" * 1000)  # a leftover that is not a prefix of the file
    fetch([server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.hits()] == ["bytes=1000-", None]


def test_500_then_success(server: Server, dest: Path) -> None:
    server.faults.extend(["status:500", "status:503"])
    fetch([server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.hits()) == 3


def test_persistent_500_gives_up_after_retries(server: Server, dest: Path) -> None:
    server.faults.extend(["status:500"] * 10)
    with pytest.raises(TransferError, match="after 3 attempt"):
        fetch([server.url()], dest, retries=2, backoff=0.01, timeout=5.0)
    assert len(server.hits()) == 3 and not dest.exists()


def test_404_on_first_mirror_then_second(server: Server, dest: Path) -> None:
    fetch([server.url("/missing"), server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.hits("/missing")) == 1  # 404 is permanent: not retried


def test_all_mirrors_failing_is_one_error(server: Server, dest: Path) -> None:
    with pytest.raises(HTTPStatusError, match="all 2 sources failed.*404.*404"):
        fetch([server.url("/a"), server.url("/b")], dest, **FAST)


def test_slow_server_times_out_in_bounded_time(server: Server, dest: Path) -> None:
    server.faults.extend(["sleep:1.5"] * 3)
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        fetch([server.url()], dest, timeout=0.3, retries=1, backoff=0.01)
    assert time.monotonic() - t0 < 3.0
    assert len(server.hits()) == 2 and not dest.exists()


def test_connection_refused_is_retried_then_fails(dest: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferError, match="connection failed"):
        fetch([f"http://127.0.0.1:{port}/file"], dest, retries=1, backoff=0.01, timeout=1.0)


# --------------------------------------------------------------------------- verification / cache


def test_wrong_checksum_deletes_part(server: Server, dest: Path) -> None:
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {SHA}"):
        fetch([server.url()], dest, sha256="0" * 64, **FAST)
    assert not dest.exists() and not part_of(dest).exists()


def test_wrong_size_is_refused_before_writing(server: Server, dest: Path) -> None:
    with pytest.raises(ChecksumError, match="expected 10"):
        fetch([server.url()], dest, size=10, **FAST)
    assert not part_of(dest).exists()


def test_valid_cache_makes_no_request(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    assert fetch([server.url()], dest, sha256=SHA, **FAST) == dest
    assert server.log == []


def test_corrupt_cache_is_downloaded_again(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:-1] + b"\0")
    fetch([server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD and len(server.hits()) == 1


def test_force_downloads_again(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    fetch([server.url()], dest, sha256=SHA, force=True, **FAST)
    assert len(server.hits()) == 1


# --------------------------------------------------------------------------- HTML pages


DRIVE_FORM = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>
</head><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{base}/download" method="get">
<input type="submit" id="uc-download-link" value="Download anyway">
<input type="hidden" name="id" value="FILEID">
<input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="1234-abcd">
</form></body></html>"""

DRIVE_LINK = """<html><head><title>Google Drive</title></head><body>
<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC_1&amp;id=FILEID">
Download anyway</a></body></html>"""


@pytest.fixture
def drive(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """Make 127.0.0.1 count as a Drive host; /uc serves a confirmation page."""
    monkeypatch.setattr(download_hosts, "DRIVE_HOSTS", download_hosts.DRIVE_HOSTS | {"127.0.0.1"})
    return server


def test_drive_form_confirmation_is_followed(drive: Server, dest: Path) -> None:
    page = DRIVE_FORM.format(base=drive.base).encode()
    drive.routes["/uc"] = lambda h, q: h.send_simple(200, page, "text/html; charset=utf-8")

    def real(h: Handler, q: dict[str, list[str]]) -> None:
        want = {"id": ["FILEID"], "export": ["download"], "confirm": ["t"], "uuid": ["1234-abcd"]}
        if q == want:
            h.serve_payload()
        else:
            h.send_simple(403, b"bad token")

    drive.routes["/download"] = real
    fetch([drive.url("/uc?export=download&id=FILEID")], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r["path"] for r in drive.log] == ["/uc", "/download"]


def test_drive_confirm_link_is_followed(drive: Server, dest: Path) -> None:
    def uc(h: Handler, q: dict[str, list[str]]) -> None:
        if q.get("confirm") == ["AbC_1"]:
            h.serve_payload()
        else:
            h.send_simple(200, DRIVE_LINK.encode(), "text/html")

    drive.routes["/uc"] = uc
    fetch([drive.url("/uc?export=download&id=FILEID")], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(drive.hits("/uc")) == 2


def test_drive_page_without_confirmation_is_refused(drive: Server, dest: Path) -> None:
    page = b"<html><head><title>Quota exceeded</title></head><body>Too many users</body></html>"
    drive.routes["/uc"] = lambda h, q: h.send_simple(200, page, "text/html")
    with pytest.raises(BadContentError, match="HTML page.*Quota exceeded"):
        fetch([drive.url("/uc?id=FILEID")], dest, **FAST)
    assert not dest.exists() and not part_of(dest).exists()
    assert len(drive.hits("/uc")) == 1


def test_html_from_other_host_is_refused_even_when_mislabelled(server: Server, dest: Path) -> None:
    # Not a Drive host, and labelled octet-stream: the body sniff still catches it.
    page = DRIVE_FORM.format(base=server.base).encode()
    server.routes["/page"] = lambda h, q: h.send_simple(200, page, "application/octet-stream")
    with pytest.raises(BadContentError, match="HTML page"):
        fetch([server.url("/page")], dest, **FAST)
    assert not dest.exists() and not part_of(dest).exists()
    assert server.hits("/download") == []


def test_html_on_first_mirror_falls_back_to_second(server: Server, dest: Path) -> None:
    server.routes["/page"] = lambda h, q: h.send_simple(200, b"<html>login</html>", "text/html")
    fetch([server.url("/page"), server.url()], dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- lock / space / offline


def test_concurrent_fetches_download_once(server: Server, dest: Path) -> None:
    server.faults.append("slowbody:0.6")
    results: list[object] = []

    def worker() -> None:
        try:
            results.append(fetch([server.url()], dest, sha256=SHA, **FAST))
        except Exception as exc:  # surfaced by the assert below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert results == [dest, dest, dest]
    assert len(server.hits()) == 1
    assert dest.read_bytes() == PAYLOAD


def test_lock_timeout(server: Server, dest: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    dest.parent.mkdir(parents=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError, match="still downloading"):
            fetch([server.url()], dest, lock_timeout=0.3, **FAST)
        assert time.monotonic() - t0 < 2.0
    assert server.log == []


def _fake_usage(free: int) -> Callable[[object], SimpleNamespace]:
    return lambda path: SimpleNamespace(total=free * 2, used=free, free=free)


def test_not_enough_space_with_known_size(server: Server, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", _fake_usage(1 << 20))
    with pytest.raises(NotEnoughSpaceError, match=r"need 3\.0 MiB.*1\.0 MiB free"):
        fetch([server.url(), server.url("/other")], dest, size=len(PAYLOAD), **FAST)
    assert server.log == []  # checked before any request


def test_not_enough_space_from_content_length(server: Server, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", _fake_usage(1 << 20))
    with pytest.raises(NotEnoughSpaceError, match="not enough disk space"):
        fetch([server.url(), server.url()], dest, **FAST)
    assert len(server.hits()) == 1  # fatal: the second mirror is not tried
    assert not part_of(dest).exists()


def test_enough_space_passes(server: Server, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", _fake_usage(1 << 30))
    fetch([server.url()], dest, sha256=SHA, size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_offline_raises_at_once(server: Server, dest: Path) -> None:
    with pytest.raises(OfflineError) as info:
        fetch([server.url()], dest, offline=True, **FAST)
    msg = str(info.value)
    assert server.url() in msg and str(dest) in msg and "\n" not in msg
    assert server.log == [] and not dest.parent.exists()


def test_offline_with_valid_cache_returns_it(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    assert fetch([server.url()], dest, sha256=SHA, offline=True) == dest


def test_offline_flag_is_held_by_the_network_policy_not_the_environment(monkeypatch):
    import os

    from typer.testing import CliRunner

    from clipcap_cli import paths
    from clipcap_cli.cli.app import app

    monkeypatch.delenv("CLIPCAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not paths.offline_requested()
    result = CliRunner().invoke(app, ["--offline", "info", "--json"])
    assert result.exit_code == 0, result.output
    assert '"offline": true' in result.stdout
    assert paths.NETWORK.offline and paths.offline_requested() and not paths.can_download()
    assert "CLIPCAP_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ
    paths.set_offline(False)
    assert not paths.offline_requested()
