"""`clipcap download` end to end against a local HTTP server (never the internet)."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.weights import registry as pretrained

runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path, tiny_config):
    """A released-format (bare torch state dict) tiny checkpoint served on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    model = build_tiny_model(tiny_config, seed=7)
    torch.save(model.state_dict(), root / "tiny_weights.pt")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, model
    server.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def tiny_registry(served, tiny_config, monkeypatch: pytest.MonkeyPatch):
    base, root, model = served
    entry = pretrained.PretrainedModel(
        name="tiny",
        description="tiny test model",
        filename="tiny_weights.pt",
        urls=(f"{base}/missing.pt", f"{base}/tiny_weights.pt"),  # the first mirror 404s
        approx_size=(root / "tiny_weights.pt").stat().st_size,
        settings={"clip_model": tiny_config.clip_model, "clip_pretrained": None, "gpt2": tiny_config.gpt2},
    )
    monkeypatch.setitem(pretrained.REGISTRY, "tiny", entry)
    monkeypatch.setenv("CLIPCAP_OFFLINE", "0")
    monkeypatch.setattr("clipcap_cli.paths.can_download", lambda host="huggingface.co": True)
    return entry, model


def test_download_records_hash_and_lists_it(tiny_registry):
    entry, model = tiny_registry
    result = runner.invoke(app, ["download", "tiny", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(entry.path)
    assert entry.path.is_file() and pretrained.is_cached(entry)
    assert len(pretrained.recorded_sha256(entry)) == 64

    listing = json.loads(runner.invoke(app, ["download", "--list", "--json"]).stdout)
    row = next(r for r in listing if r["name"] == "tiny")
    assert row["cached"] is True and row["path"] == str(entry.path)
    assert {r["name"] for r in listing} >= {"coco", "conceptual", "coco-transformer"}

    result = runner.invoke(app, ["download", "--path", "tiny"])
    assert result.exit_code == 0 and result.stdout.strip() == str(entry.path)

    # The downloaded file is usable by name, with the registry's settings.
    path, settings = pretrained.resolve("tiny")
    assert path == entry.path and settings["clip_model"] == entry.settings["clip_model"]


def test_corrupt_cached_file_is_fetched_again(tiny_registry):
    entry, _ = tiny_registry
    assert runner.invoke(app, ["download", "tiny", "-q", "--no-backbones"]).exit_code == 0
    good = entry.path.read_bytes()
    entry.path.write_bytes(good[:-10] + b"0123456789")  # same size, wrong content
    result = runner.invoke(app, ["download", "tiny", "-q", "--no-backbones", "--force"])
    assert result.exit_code == 0, result.output
    assert entry.path.read_bytes() == good


def test_a_file_that_is_not_a_checkpoint_is_removed(tiny_registry, served):
    entry, _ = tiny_registry
    _, root, _ = served
    (root / "tiny_weights.pt").write_bytes(b"this is not a checkpoint" * 100)
    result = runner.invoke(app, ["download", "tiny", "--no-backbones"])
    assert result.exit_code == 1
    assert "not a valid checkpoint" in result.stderr and "Traceback" not in result.output
    assert not entry.path.exists()


def test_offline_says_what_and_where(monkeypatch: pytest.MonkeyPatch):
    result = runner.invoke(app, ["download", "coco", "--offline"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "huggingface.co/akhaliq/CLIP-prefix-captioning-COCO-weights" in line
    assert str(pretrained.REGISTRY["coco"].path) in line


def test_path_of_missing_model_and_unknown_names():
    result = runner.invoke(app, ["download", "--path", "coco"])
    assert result.exit_code == 1 and result.stdout.strip().endswith("coco_weights.pt")
    result = runner.invoke(app, ["download", "cocoo"])
    assert result.exit_code == 2 and "did you mean coco?" in result.stderr
    assert runner.invoke(app, ["download"]).exit_code == 2


def test_manually_placed_file_is_verified_and_used(tiny_registry, served, monkeypatch):
    entry, _ = tiny_registry
    _, root, _ = served
    entry.path.write_bytes((root / "tiny_weights.pt").read_bytes())
    monkeypatch.setattr("clipcap_cli.paths.can_download", lambda host="huggingface.co": False)
    path, _ = pretrained.resolve("tiny")
    assert path == entry.path and pretrained.recorded_sha256(entry)


# --------------------------------------------------------------------------- published checksums


class _HubHandler(SimpleHTTPRequestHandler):
    """A Hugging Face mirror as the hub answers for an LFS file: ``/org/repo/resolve/main/FILE``
    redirects to a CDN URL, and the redirect carries ``X-Linked-Etag`` (the sha256, quoted) and
    ``X-Linked-Size``. ``/drive/FILE`` is a fallback that publishes nothing."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _resolve(self, head: bool) -> None:
        st = self.state
        if st.get("hub_down"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(302)
        self.send_header("Location", "/cdn/" + self.path.rsplit("/", 1)[1])
        self.send_header("X-Linked-Etag", f'"{st["published"]}"')
        self.send_header("X-Linked-Size", str(len(st["hub_bytes"])))
        self.send_header("ETag", f'"{st["published"]}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        if "/resolve/" in self.path:
            return self._resolve(head=True)
        return super().do_HEAD()

    def do_GET(self):
        if "/resolve/" in self.path:
            return self._resolve(head=False)
        if self.path.startswith("/cdn/") and self.state.get("cdn_down"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.state["hub_bytes"] if self.path.startswith("/cdn/") else self.state["drive_bytes"]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hub(tmp_path: Path, tiny_config, monkeypatch: pytest.MonkeyPatch):
    import hashlib

    model = build_tiny_model(tiny_config, seed=7)
    torch.save(model.state_dict(), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    state = {"hub_bytes": good, "drive_bytes": good, "published": hashlib.sha256(good).hexdigest()}
    handler = type("Handler", (_HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    entry = pretrained.PretrainedModel(
        name="tinyhub",
        description="tiny test model on a hub mirror",
        filename="tinyhub_weights.pt",
        urls=(f"{base}/org/repo/resolve/main/tinyhub_weights.pt", f"{base}/drive/tinyhub_weights.pt"),
        approx_size=len(good),
        settings={"clip_model": tiny_config.clip_model, "clip_pretrained": None, "gpt2": tiny_config.gpt2},
    )
    monkeypatch.setitem(pretrained.REGISTRY, "tinyhub", entry)
    monkeypatch.setenv("CLIPCAP_OFFLINE", "0")
    monkeypatch.setattr("clipcap_cli.paths.can_download", lambda host="huggingface.co": True)
    yield entry, state
    server.shutdown()


def test_hub_published_sha256_is_checked_and_recorded(hub):
    entry, state = hub
    result = runner.invoke(app, ["download", "tinyhub", "-q", "--no-backbones"])
    assert result.exit_code == 0, result.output
    assert pretrained.record(entry) == {
        "sha256": state["published"],
        "size": len(state["hub_bytes"]),
        "mtime_ns": entry.path.stat().st_mtime_ns,
        "verified_by": "127.0.0.1",
    }
    assert "no checksum" not in result.stderr
    listing = json.loads(runner.invoke(app, ["download", "--list", "--json"]).stdout)
    row = next(r for r in listing if r["name"] == "tinyhub")
    assert row["sha256"] == state["published"] and row["verified_by"] == "127.0.0.1"


def test_download_that_does_not_match_the_published_hash_is_refused(hub):
    entry, state = hub
    state["hub_bytes"] = state["hub_bytes"][:-10] + b"0123456789"  # corrupted in transit (same size)
    state["drive_bytes"] = b"not the model" * 10
    result = runner.invoke(app, ["download", "tinyhub", "--no-backbones"])
    assert result.exit_code == 1
    assert "sha256 mismatch" in result.stderr and "Traceback" not in result.output
    assert not entry.path.exists() and not pretrained.record(entry)


def test_a_published_hash_binds_the_fallback(hub):
    """The mirror publishes the hash but its file server fails: the Drive copy is checked against
    the published hash, and so counts as verified."""
    entry, state = hub
    state["cdn_down"] = True
    result = runner.invoke(app, ["download", "tinyhub", "-q", "--no-backbones"])
    assert result.exit_code == 0, result.output
    assert pretrained.record(entry)["verified_by"] == "127.0.0.1" and "no checksum" not in result.stderr
    entry.path.unlink()
    state["drive_bytes"] = state["hub_bytes"][:-10] + b"0123456789"
    result = runner.invoke(app, ["download", "tinyhub", "--no-backbones"])
    assert result.exit_code == 1 and "sha256 mismatch" in result.stderr and not entry.path.exists()


def test_drive_fallback_is_recorded_unverified_and_said(hub):
    entry, state = hub
    state["hub_down"] = True
    result = runner.invoke(app, ["download", "tinyhub", "--no-backbones"])
    assert result.exit_code == 0, result.output
    assert "publishes no checksum" in result.stderr and "127.0.0.1" in result.stderr
    rec = pretrained.record(entry)
    assert rec["verified_by"] is None and len(rec["sha256"]) == 64


def test_force_never_replaces_a_verified_hash_with_an_unverified_one(hub):
    entry, state = hub
    assert runner.invoke(app, ["download", "tinyhub", "-q", "--no-backbones"]).exit_code == 0
    verified = pretrained.record(entry)
    original = entry.path.read_bytes()
    # The mirror is gone and the fallback serves other bytes: --force must not swap them in.
    state["hub_down"] = True
    state["drive_bytes"] = original[:-10] + b"0123456789"
    result = runner.invoke(app, ["download", "tinyhub", "--force", "--no-backbones"])
    assert result.exit_code == 1 and "sha256 mismatch" in result.stderr
    assert entry.path.read_bytes() == original and pretrained.record(entry) == verified
    # The fallback serving the verified bytes is fine, and the record stays verified.
    state["drive_bytes"] = original
    result = runner.invoke(app, ["download", "tinyhub", "--force", "--no-backbones"])
    assert result.exit_code == 0, result.output
    renewed = pretrained.record(entry)  # a new file (a new mtime), the same verified bytes
    assert {**renewed, "mtime_ns": None} == {**verified, "mtime_ns": None}
