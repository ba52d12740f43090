"""int8 routes on one linear layer, against fp32: the measurement behind ``clipcap_cli/decoding/quantize.py``'s choice.

``quantize.py`` runs torch's built-in dynamic quantisation (``torch.ao.quantization.quantize_dynamic``),
an API torch marks deprecated. These rows keep the alternatives measured beside it, so that the
choice can be revisited when torch removes it (issue 24):

- ``torch quantize_dynamic``: the route clipcap takes (``quantize.quantize_int8``, fbgemm/x86 kernels);
- ``onnxruntime fp32`` and ``onnxruntime int8``: the same layer as an ONNX graph (MatMul + Add, built
  with ``onnx.helper``: no exporter needed), run by onnxruntime as it is, and after
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights per output channel, uint8 activations
  quantised at run time: ORT's recommended form on x86);
- ``torchao int8``: torchao's ``Int8DynamicActivationInt8WeightConfig``, eager, where torchao is installed.

A route whose package is missing is skipped with its reason. Each row gives the best time of
``repeat`` rounds, the speed against torch fp32 on the same shape, and the largest error against
fp32's output relative to its largest value. Used by ``bench_precision.py`` (``--routes``).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

# (in, out, M): GPT-2's MLP layer at decoding (M = 64 rows, a step of 64 captions), at CLIP's shapes
# (M = 3200 rows: ViT-B/32's 50 tokens for 64 images) and GPT-2's LM head at decoding: issue 24's shapes.
SHAPES = ((768, 3072, 64), (768, 3072, 3200), (768, 50257, 64))
DRY_SHAPES = ((32, 64, 4), (32, 64, 40))
ROUTES = ("torch fp32", "torch quantize_dynamic", "onnxruntime fp32", "onnxruntime int8", "torchao int8")


def _best(calls: dict[str, Callable[[], object]], repeat: int, reps: int) -> dict[str, float]:
    """Each call's best seconds per call over ``repeat`` rounds of ``reps`` calls, after two warm-up
    calls; the rounds alternate between the calls, so that a busy machine slows them alike."""
    best = dict.fromkeys(calls, float("inf"))
    for call in calls.values():
        call()
        call()
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(reps):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
    return best


def _onnx_linear(linear: nn.Linear, path: Path) -> Path:
    """``linear`` as an ONNX graph Y = X @ W^T + b (MatMul + Add), the rows dimension dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_out, n_in = linear.weight.shape
    weight = numpy_helper.from_array(linear.weight.detach().t().contiguous().numpy(), "W")
    bias = numpy_helper.from_array(linear.bias.detach().numpy(), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n_out])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime release of the last years
    onnx.save(model, str(path))
    return path


def _onnxruntime_runners(linear: nn.Linear, tmp: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _onnx_linear(linear, tmp / "linear.onnx")
    int8 = tmp / "linear.int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph (shape inference) on the root logger
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    runners = {}
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda x, s=session: s.run(["Y"], {"X": x})[0]
    return runners


def _torchao_linear(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    module = copy.deepcopy(linear)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


def skipped_routes() -> dict[str, str]:
    """The routes this environment cannot run, with why."""
    import importlib.util

    missing = {}
    for route, modules in (("onnxruntime", ("onnxruntime", "onnx")), ("torchao", ("torchao",))):
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            missing[route] = f"{' and '.join(absent)} not installed (pip install {' '.join(absent)})"
    return missing


def measure(dry_run: bool = False, repeat: int = 5) -> dict:
    """{"rows": [...], "skipped": {route: why}}: each route on each shape, against torch fp32."""
    from clipcap_cli.decoding.quantize import quantize_int8

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    skipped = skipped_routes()
    rows = []
    for n_in, n_out, m in DRY_SHAPES if dry_run else SHAPES:
        reps = 2 if dry_run else max(1, 200_000_000 // (n_in * n_out * m) + 1)
        linear = nn.Linear(n_in, n_out).eval()
        x = torch.randn(m, n_in)
        x_np = x.numpy()
        with torch.inference_mode():
            expected = linear(x)
            scale = float(expected.abs().max())
            calls: dict[str, Callable[[], torch.Tensor]] = {"torch fp32": lambda: linear(x)}
            quantized = quantize_int8(nn.Sequential(copy.deepcopy(linear)))
            calls["torch quantize_dynamic"] = lambda: quantized(x)
            if "torchao" not in skipped:
                try:
                    ao = _torchao_linear(linear)
                    calls["torchao int8"] = lambda: ao(x)
                except Exception as exc:  # noqa: BLE001 - a torchao/torch pairing that does not run: say so
                    skipped["torchao"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            with tempfile.TemporaryDirectory() as tmp_dir:
                if "onnxruntime" not in skipped:
                    for name, runner in _onnxruntime_runners(linear, Path(tmp_dir), threads).items():
                        calls[name] = lambda r=runner: torch.from_numpy(r(x_np))
                best = _best(calls, repeat, reps)
                for name, call in calls.items():
                    error = float((call() - expected).abs().max()) / scale
                    rows.append(
                        {"route": name, "in": n_in, "out": n_out, "m": m, "seconds": best[name], "error": error}
                    )
        fp32 = rows[-len(calls)]["seconds"]  # this shape's torch fp32 row (the first)
        for row in rows[-len(calls) :]:
            seconds = row.pop("seconds")
            row.update(
                ms=round(seconds * 1e3, 4),
                x_fp32=round(fp32 / seconds, 3),
                gflops=round(2 * n_in * n_out * m / seconds / 1e9, 1),
                error=round(row["error"], 5),
            )
    return {"rows": rows, "skipped": skipped, "threads": threads}


def print_routes(routes: dict) -> None:
    """The rows as a Markdown table (one column per shape), then what was skipped."""
    shapes = list(dict.fromkeys((r["in"], r["out"], r["m"]) for r in routes["rows"]))
    print(f"\nint8 routes on one nn.Linear, against torch fp32 ({routes['threads']} threads):\n")
    print("| route | " + " | ".join(f"{i}->{o}, M={m}" for i, o, m in shapes) + " | max error (rel.) |")
    print("|---|" + "---:|" * (len(shapes) + 1))
    for route in ROUTES:
        cells = {(r["in"], r["out"], r["m"]): r for r in routes["rows"] if r["route"] == route}
        if not cells:
            continue
        speeds = [
            f"{cells[s]['x_fp32']:.2f}x ({cells[s]['gflops']:.0f} GFLOP/s)" if s in cells else "-" for s in shapes
        ]
        error = max(c["error"] for c in cells.values())
        print(f"| {route} | " + " | ".join(speeds) + f" | {error:.4f} |")
    for route, why in routes["skipped"].items():
        print(f"skipped {route}: {why}")
