"""benchmarks/device_check.py, the GPU check the lead runs when a GPU is lent: its --dry-run
(tiny shapes on the CPU) must run every part and print one JSON object with every number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_dry_run():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["errors"] == {} and report["skipped"] == []
    for strategy in ("greedy", "beam5"):
        for batch in ("4", "8"):
            row = report["caption"][strategy][batch]
            for key in ("fp32", "bf16", "generate_fp32", "generate_bf16", "x_generate_fp32", "x_generate_bf16"):
                assert row[key] > 0, (strategy, batch, key)
    assert report["clip_images_per_s"] > 0
    assert report["train_only_prefix"]["steps_per_s"] > 0
    agreement = report["gpu_cpu_identical"]
    assert agreement["images"] == 4 and agreement["greedy"] == agreement["beam5"] == 4  # the CPU against itself
    assert report["ddp_step"] == {"backend": "gloo", "ok": True, "seconds": report["ddp_step"]["seconds"]}
