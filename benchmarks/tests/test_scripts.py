"""The benchmark scripts run and report what they claim (their timings are measured by running them,
never asserted). Run by `.ci/run` after the test suite, as the benchmark job: `pytest benchmarks/tests`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the planted real layouts (tests/released.py)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Nothing reaches the user's data directory or the network."""
    monkeypatch.setenv("CLIPCAP_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from released import plant_everything

    return plant_everything(tmp_path_factory.mktemp("planted"))


def test_startup_benchmark_quick_run(planted: Path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), "--quick", "--json", "--home", str(planted)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The report is consistent with itself: the ratio is the two medians' ratio, the caption is real.
    assert report["ratio"] == pytest.approx(report["caption_s"] / report["bare_imports_s"], abs=2e-3)
    assert (
        report["record"]["error"] is None and report["record"]["path"].endswith(".jpg") and report["record"]["caption"]
    )
    assert set(report["peak_rss_gb"]) == {"bare", "ours"}
    assert (
        report["peak_rss_gb"]["ours"] > report["peak_rss_gb"]["bare"]
    )  # clipcap maps the weights on top of the imports
    # The import steps add up to the last step's RSS; the CPU is named with its capability.
    steps = report["imports"]
    assert [s["step"] for s in steps[:2]] == ["python", "torch"] and all(s["rss_mb"] > 0 for s in steps[:-1])
    assert sum(s["adds_mb"] for s in steps[:-1]) == pytest.approx(steps[-2]["rss_mb"], abs=len(steps))
    assert steps[-1]["adds_mb"] is None and 0 <= steps[-1]["rss_mb"] < steps[1]["rss_mb"]  # CUDA pages: part of torch's
    assert report["cpu"]["name"] and "bf16" in report["cpu"]["capability"]


def test_device_check_dry_run():
    """benchmarks/device_check.py --dry-run (tiny shapes on the CPU) runs every part and prints one JSON."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["errors"] == {} and report["skipped"] == []
    for strategy in ("greedy", "beam5"):
        for batch in ("4", "8"):
            row = report["caption"][strategy][batch]
            for key in ("fp32", "bf16", "generate_fp32", "generate_bf16", "x_generate_fp32", "x_generate_bf16"):
                assert row[key] > 0, (strategy, batch, key)
    agreement = report["gpu_cpu_identical"]
    assert agreement["images"] == 4 and agreement["greedy"] == agreement["beam5"] == 4  # the CPU against itself
    assert report["ddp_step"] == {"backend": "gloo", "ok": True, "seconds": report["ddp_step"]["seconds"]}


def test_embeddings_benchmark_dry_run():
    """benchmarks/bench_embeddings.py --dry-run: both paths run on the tiny models and agree caption for caption."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_embeddings.py"), "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["images"] == 8 and report["cpu"]
    assert report["images_per_s"]["jpeg"] > 0 and report["images_per_s"]["embeddings"] > 0
    assert report["identical_captions"] == 8  # stored embeddings give the images' own captions


@pytest.mark.slow
def test_streaming_benchmark_quick_run(tmp_path: Path):
    """benchmarks/streaming.py on two tiny sharded stores: a JSON line per store and the ratios line."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "streaming.py"), "--work", str(tmp_path), "--captions", "2000,4000"]
        + ["--steps", "5", "--shard-images", "100"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    header, small, big, ratios = lines
    assert header["cpu"] and header["cpu_capability"]
    assert (small["captions"], small["shards"], big["captions"], big["shards"]) == (2000, 4, 4000, 8)
    assert small["steps"] == big["steps"] == 5 and small["steps_per_s"] > 0 and not small["tokens_cached_before"]
    assert small["peak_rss_mb"] >= small["rss_at_start_mb"] > 0
    assert ratios["peak_rss_ratio"] == pytest.approx(big["peak_rss_mb"] / small["peak_rss_mb"], abs=1e-3)
    assert (tmp_path / "store-4000" / "tokens" / "shard-000007.safetensors").is_file()  # cached for a rerun


def test_precision_benchmark_dry_run(monkeypatch):
    """benchmarks/bench_precision.py --dry-run: the capability, every precision's speed, ratio and agreement
    in one JSON; with a faked AVX2-only CPU, fast runs int8 and bf16 runs fp32 (never emulated bf16)."""
    monkeypatch.setenv("CLIPCAP_CPU_CAPABILITY", "AVX2")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_precision.py"), "--dry-run", "--json", "--images", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["cpu"]["isa"] == "AVX2" and report["cpu"]["native_bf16"] is False
    assert report["resolved"] == {"fp32": "fp32", "bf16": "fp32", "int8": "int8", "fast": "int8"}
    assert "no native bf16" in done.stderr  # the one warning line, for the bf16 row
    for strategy in ("greedy", "beam5"):
        rows = report["results"][strategy]
        assert set(rows) == {"fp32", "bf16", "int8", "fast"}
        assert rows["fp32"]["x_fp32"] == 1 and rows["fp32"]["identical_to_fp32"] == 3
        assert rows["fast"] == rows["int8"] and rows["bf16"] == rows["fp32"] | {"runs_as": "fp32"}
        assert all(r["images_per_s"] > 0 and 0 <= r["identical_to_fp32"] <= 3 for r in rows.values())
    # The int8 routes on one linear layer: torch's (the one clipcap takes) always, the others or why not.
    routes = report["int8_routes"]
    by_route = {}
    for row in routes["rows"]:
        by_route.setdefault(row["route"], []).append(row)
        assert row["ms"] > 0 and row["x_fp32"] > 0 and row["gflops"] >= 0 and row["m"] > 0
        assert 0 <= row["error"] < (1e-5 if row["route"].endswith("fp32") else 0.1)  # int8: close, not exact
    shapes = {(r["in"], r["out"], r["m"]) for r in routes["rows"]}
    assert len(shapes) == 2 and all(len(rows) == len(shapes) for rows in by_route.values())
    assert {"torch fp32", "torch quantize_dynamic"} <= set(by_route)
    assert all(r["x_fp32"] == pytest.approx(1, abs=1e-2) for r in by_route["torch fp32"])
    for route, needs in (("onnxruntime", ("onnxruntime fp32", "onnxruntime int8")), ("torchao", ("torchao int8",))):
        assert (route in routes["skipped"]) != (set(needs) <= set(by_route)), route


def test_serve_benchmark_dry_run():
    """benchmarks/bench_serve.py --dry-run: the tiny model served under 4 client threads, no error, the
    CLI's captions, batches formed, and a clean exit on SIGTERM."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    server = report["server"]
    assert report["dry_run"] is True and report["model"] == "tiny" and report["cpu"]
    assert server["requests"] == 24 and server["errors"] == 0, server["first_errors"]
    assert server["same_caption_as_cli"] == 24  # every answer is the CLI's caption for that image
    assert 1 <= server["mean_batch_size"] <= server["largest_batch"] <= report["max_batch"]
    assert 0 < server["p50_ms"] <= server["p95_ms"] and server["requests_per_s"] > 0 and report["cli_images_per_s"] > 0
    assert server["exit_code_after_sigterm"] == 0


def test_lora_benchmark_quick_run():
    """benchmarks/bench_lora.py --quick: a row per mode; LoRA trains the mapper and its adapters, no more."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--quick", "--json", "--rank", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["only-prefix", "lora", "full"]
    width, layers, rank = report["settings"]["width"], report["settings"]["layers"], report["settings"]["rank"]
    # GPT-2's adapted modules per layer: c_attn (w -> 3w), attn.c_proj (w -> w), c_fc (w -> 4w), mlp.c_proj (4w -> w)
    adapters = layers * rank * ((width + 3 * width) + (width + width) + (width + 4 * width) + (4 * width + width))
    mapper = rows["only-prefix"]["trainable_params"]
    assert rows["lora"]["trainable_params"] == mapper + adapters
    assert rows["full"]["trainable_params"] == mapper + report["lm_params"]
    assert rows["lora"]["checkpoint_mb"] < rows["full"]["checkpoint_mb"] / 10  # mapper + adapters only
    assert all(r["steps"] == rows["full"]["steps"] > 0 and r["held_out_loss"] > 0 for r in rows.values())


def test_lm_decoding_benchmark_tiny_run():
    """benchmarks/bench_lm_decoding.py --size tiny: a row per family and decoding for each path, ratios that are
    the times' own, and the static stepper's tokens identical to the generic stepper's and to ``generate``'s."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lm_decoding.py"), "--size", "tiny", "--json"]
        + ["--batch", "2", "--tokens", "5"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["size"] == "tiny" and report["cpu"]["name"] and report["cpu"]["isa"]
    steppers = {family: res["stepper"] for family, res in report["families"].items()}
    assert steppers == {"gpt2": "StaticGPT2", "opt": "StaticOPT", "smollm2": "StaticLlama"}
    for family, res in report["families"].items():
        for label in ("greedy", "beam5"):
            row = res[label]
            assert set(row) >= {"static", "forward", "generate"}, (family, label)
            for name in ("static", "forward", "generate"):
                path = row[name]
                assert path["seconds"] > 0 and path["cpu_seconds"] > 0
                for key, ratio in (
                    ("x_generate", row["generate"]["seconds"] / path["seconds"]),
                    ("x_generate_cpu", row["generate"]["cpu_seconds"] / path["cpu_seconds"]),
                ):
                    assert path[key] == pytest.approx(ratio, rel=2e-3, abs=2e-3), (family, label, name, key)
            assert row["generate"]["x_generate"] == 1
            assert row["identical_to_forward"] == row["identical_to_generate"] == 2, (family, label)
            assert 2 <= row["new_tokens"] <= 2 * 5
