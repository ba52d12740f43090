"""Start-up cost of a first caption: `clipcap caption one.jpg` against a bare Python importing what
any ClipCap program must (torch, open_clip and transformers' GPT-2), on full-size weights.

    python benchmarks/bench_startup.py                   # plants full-size random weights in a temp dir
    python benchmarks/bench_startup.py --home DIR        # a data directory that already holds them
    python benchmarks/bench_startup.py --quick --home DIR   # one run each (the test suite's smoke run)

Each run is a fresh process, timed from start to exit; runs alternate between the two sides so
that a busy machine slows both alike. Peak RSS is the process's own (``wait4``). Linux starts a
child's peak RSS at its parent's peak (``ru_maxrss`` survives fork and exec), so this script keeps
itself small: it imports no torch, and plants the weights in a child process of its own; a peak
that is not above this script's own (VmHWM) is reported as unmeasurable. The first caption after a
download also converts the released .pt to safetensors; it is reported on its own line.
``imports`` is the RSS each import step adds, in a fresh process, in the order a caption meets
them: the top contributors to the start-up memory. Each step is charged what it alone adds to the
steps before it (``torch._dynamo``, imported by both torchvision and transformers' GPT-2, is a step
of its own so that neither hides it).
Targets (issues 11 and 24): wall time <= 1.5x the bare imports, peak RSS <= 1.6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
# What a first caption imports, in steps (see the docstring): the label, then the statement.
IMPORT_STEPS = (
    ("python", "pass"),
    ("torch", "import torch"),
    ("safetensors, PIL, tokenizers, numpy", "import safetensors.torch, PIL.Image, tokenizers, numpy"),
    ("transformers (the tokenizer)", "from transformers import GPT2TokenizerFast"),
    (
        "torch._dynamo, without triton (via torchvision.ops and transformers.masking_utils)",
        "import sys; sys.modules['triton'] = None; import torch._dynamo",
    ),
    (
        "triton (torch._dynamo's, where installed; the clipcap process keeps it out of a CPU run)",
        "del sys.modules['triton']\ntry:\n    import triton\nexcept ImportError:\n    pass",
    ),
    ("torchvision", "import torchvision.transforms"),
    ("torch.distributed.tensor (via transformers.activations)", "import torch.distributed.tensor"),
    ("transformers' GPT-2 model", "from transformers import GPT2LMHeadModel"),
    ("timm (via open_clip)", "import timm"),
    ("open_clip", "import open_clip"),
    (
        "clipcap_cli's caption path",
        "import clipcap_cli.loading, clipcap_cli.captioner, clipcap_cli.cli.commands.caption",
    ),
)
PROBE = """
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
steps = json.loads(sys.argv[1])
out = []
for label, stmt in steps:
    start = time.perf_counter()
    exec(stmt)
    out.append([label, rss(), time.perf_counter() - start])
cuda, name = 0, ""
for line in open("/proc/self/smaps"):
    head = line.split()
    if "-" in head[0] and not line[0].isupper():
        name = head[5] if len(head) > 5 else ""
    elif head[0] == "Rss:" and ("/nvidia/" in name or "libtorch_cuda" in name or "/libcu" in name):
        cuda += int(head[1]) * 1024
out.append(["of which CUDA libraries' pages (torch's CUDA wheels)", cuda, 0.0])
print(json.dumps(out))
"""
CAPABILITY = "from clipcap_cli.cpu import capability, cpu_name; print(cpu_name()); print(capability())"


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, proc.stdout


def peak_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> float | None:
    """Peak RSS (GB) of one run, measured on the child alone (``/usr/bin/time`` style, via wait4); None
    when it is not above this process's own peak, which a child inherits as its starting value."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    if usage.ru_maxrss <= own_peak_kb():
        return None
    return usage.ru_maxrss / 1e6


def own_peak_kb() -> int:
    """This process's own peak RSS (KiB): its memory's high-water mark (Linux: VmHWM), which a child
    starts from. Not ``getrusage(RUSAGE_SELF)``: that too starts at this process's parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def import_steps(env: dict[str, str], cwd: Path) -> list[dict]:
    """RSS (MB) each of IMPORT_STEPS adds, in one fresh process (Linux: /proc/self/status)."""
    _, out = run([sys.executable, "-c", PROBE, json.dumps(IMPORT_STEPS)], env, cwd)
    steps, before = [], 0
    *rows, (cuda_label, cuda, _) = json.loads(out.strip().splitlines()[-1])
    for label, rss, seconds in rows:
        steps.append(
            {
                "step": label,
                "rss_mb": round(rss / 2**20),
                "adds_mb": round((rss - before) / 2**20),
                "s": round(seconds, 2),
            }
        )
        before = rss
    steps.append({"step": cuda_label, "rss_mb": round(cuda / 2**20), "adds_mb": None, "s": 0.0})
    return steps


def plant(home: Path) -> Path:
    """Full-size random weights in ``home``, planted by a child (this process stays small: see peak_rss)."""
    code = "import sys; from pathlib import Path; from released import plant_everything; plant_everything(Path(sys.argv[1]))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", code, str(home)], env=env, check=True, stdout=subprocess.DEVNULL)
    return home


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="a CLIPCAP_HOME holding the planted (or real) models")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--quick", action="store_true", help="one run of each side (a smoke test, not a measurement)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-imports", action="store_true", help="skip the import steps' RSS (a Linux-only probe)")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat

    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent)) or "clipcap"
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    home = args.home
    if home is None:
        home = plant(work / "home")
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
    steps = [] if args.no_imports or not Path("/proc/self/status").is_file() else import_steps(env, work)
    cpu = run([sys.executable, "-c", CAPABILITY], env, work)[1].strip().splitlines()
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "repeat": repeat,
        "bare_imports_s": round(med["bare"], 3),
        "caption_s": round(med["ours"], 3),
        "ratio": round(med["ours"] / med["bare"], 3),
        "ratio_target": WALL_TARGET,
        "first_caption_with_conversion_s": round(first, 3) if first is not None else None,
        "peak_rss_gb": {k: round(v, 3) if v is not None else None for k, v in rss.items()},
        "rss_target_gb": RSS_TARGET_GB,
        "imports": steps,
        "cpu": {"name": cpu[0], "capability": cpu[1]},
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
    gb = {k: f"{v:.2f} GB" if v is not None else "unmeasurable (not above this script's own)" for k, v in rss.items()}
    print(f"peak RSS: clipcap {gb['ours']} (target <= {RSS_TARGET_GB} GB), bare imports {gb['bare']}")
    print(f"CPU: {cpu[0]} (torch: {cpu[1]})")
    if steps:
        print("\nRSS by import step (each step: what it adds to the ones above it):\n")
        print("| import | adds MB | RSS MB |\n|---|---:|---:|")
        for step in steps:
            adds = "" if step["adds_mb"] is None else step["adds_mb"]
            print(f"| {step['step']} | {adds} | {step['rss_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
