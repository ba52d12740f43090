"""Start-up cost of a first caption: `clipcap caption one.jpg` against a bare Python importing what
any ClipCap program must (torch, open_clip and transformers' GPT-2), on full-size weights.

    python benchmarks/bench_startup.py                   # plants full-size random weights in a temp dir
    python benchmarks/bench_startup.py --home DIR        # a data directory that already holds them
    python benchmarks/bench_startup.py --quick --home DIR   # one run each (the test suite's smoke run)

Each run is a fresh process, timed from start to exit; runs alternate between the two sides so
that a busy machine slows both alike. Peak RSS is the process's own (``wait4``). The first caption
after a download also converts the released .pt to safetensors; it is reported on its own line.
Targets (issue 11): wall time <= 1.5x the bare imports, peak RSS <= 1.6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the planting code the offline rehearsal uses
PHOTO = ROOT / "tests" / "data" / "photos" / "COCO_val2014_000000354533.jpg"
BARE_IMPORTS = "import torch, open_clip; from transformers import GPT2LMHeadModel"
WALL_TARGET, RSS_TARGET_GB = 1.5, 1.6


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, proc.stdout


def peak_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Peak RSS (GB) of one run, measured on the child alone (``/usr/bin/time`` style, via wait4)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    return usage.ru_maxrss / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="a CLIPCAP_HOME holding the planted (or real) models")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--quick", action="store_true", help="one run of each side (a smoke test, not a measurement)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat

    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent)) or "clipcap"
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    home = args.home
    if home is None:
        from released import plant_everything

        home = plant_everything(work / "home")
    shutil.copyfile(PHOTO, work / "one.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPCAP_DEBUG",)}
    env.update(CLIPCAP_HOME=str(home), CLIPCAP_OFFLINE="1", HF_HUB_OFFLINE="1")
    ours = [exe, "caption", "one.jpg"]
    bare = [sys.executable, "-c", BARE_IMPORTS]

    converted = (Path(home) / "models" / "coco_weights.safetensors").is_file()
    first = None
    if not converted:
        first, _ = run(ours, env, work)
    walls: dict[str, list[float]] = {"bare": [], "ours": []}
    caption = ""
    for _ in range(repeat):
        walls["bare"].append(run(bare, env, work)[0])
        wall, out = run(ours, env, work)
        walls["ours"].append(wall)
        caption = out.strip()
    rss = {"bare": peak_rss(bare, env, work), "ours": peak_rss(ours, env, work)}
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "repeat": repeat,
        "bare_imports_s": round(med["bare"], 3),
        "caption_s": round(med["ours"], 3),
        "ratio": round(med["ours"] / med["bare"], 3),
        "ratio_target": WALL_TARGET,
        "first_caption_with_conversion_s": round(first, 3) if first is not None else None,
        "peak_rss_gb": {k: round(v, 3) for k, v in rss.items()},
        "rss_target_gb": RSS_TARGET_GB,
        "record": json.loads(caption.splitlines()[-1]) if caption else None,
    }
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"bare imports ({BARE_IMPORTS}): {med['bare']:.2f} s (median of {repeat})")
    print(
        f"clipcap caption one.jpg:       {med['ours']:.2f} s -> ratio {result['ratio']:.2f}x (target <= {WALL_TARGET}x)"
    )
    if first is not None:
        print(f"first caption (converts the .pt to safetensors): {first:.2f} s")
    print(f"peak RSS: clipcap {rss['ours']:.2f} GB (target <= {RSS_TARGET_GB} GB), bare imports {rss['bare']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
