"""Decoding speed per LM family: clipcap's static stepper against the generic stepper and the LM's own ``generate``.

For each family, a model built from the real architecture's config with random weights (nothing is
downloaded): GPT-2 124M, OPT-125m and SmolLM2-135M (Llama-style: RMSNorm, rotary positions,
grouped-query attention). The same prefix of K=10 random embeddings per row, B rows, N new tokens,
greedy and beam 5, decoded three ways on the same model:

- clipcap's static stepper (``inference.open_inference``: ``StaticGPT2`` / ``StaticOPT`` / ``StaticLlama``),
  through ``decoding.greedy`` / ``decoding.beam_search``;
- the same decoders over ``inference.ForwardStepper`` (the model's forward with a ``DynamicCache``);
- the model's own ``generate(inputs_embeds=prefix, num_beams=..., do_sample=False)``.

It prints the CPU (``clipcap_cli.cpu``), each path's seconds and tokens/s, ``x generate`` (how many
times faster than ``generate``), and how many rows' tokens are identical to ``generate``'s and to the
generic stepper's. Decoding only: no CLIP, no mapper. Random weights rarely emit the stop token, so
every row runs to N tokens on every path. The paths alternate within each repeat; each keeps its best time,
wall-clock and this process's CPU time (steadier on a shared machine when torch runs one thread:
``OMP_NUM_THREADS=1``).

    python benchmarks/bench_lm_decoding.py                       # full size, B=8, N=20, 2 repeats
    python benchmarks/bench_lm_decoding.py --families smollm2 --batch 16 --json
    python benchmarks/bench_lm_decoding.py --size tiny --json    # tiny configs, seconds (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipcap_cli.cpu import capability, cpu_name  # noqa: E402
from clipcap_cli.decoding import decode as decoding  # noqa: E402
from clipcap_cli.decoding.inference import ForwardStepper, open_inference  # noqa: E402

PREFIX_LENGTH = 10  # K, as ClipCap's released COCO models
STOP = 13  # "." in GPT-2's vocabulary; with random weights it is rarely chosen
FAMILIES = ("gpt2", "opt", "smollm2")

# The real architectures' configs (GPT-2 124M, facebook/opt-125m, HuggingFaceTB/SmolLM2-135M), as in their config.json.
FULL = {
    "gpt2": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
    "opt": {
        "vocab_size": 50272,
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768,
        "do_layer_norm_before": True,
    },
    "smollm2": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
TINY = {
    "gpt2": {"vocab_size": 300, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    "opt": {
        "vocab_size": 300,
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
    },
    "smollm2": {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
}


def build(family: str, size: str) -> Any:
    """A random-weight causal LM of ``family``'s architecture (fp32, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    config_cls, model_cls = {
        "gpt2": (GPT2Config, GPT2LMHeadModel),
        "opt": (OPTConfig, OPTForCausalLM),
        "smollm2": (LlamaConfig, LlamaForCausalLM),
    }[family]
    settings = (FULL if size == "full" else TINY)[family]
    torch.manual_seed(0)
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    return model_cls(config_cls(**settings, **ids)).eval()


class Caption:
    """What ``decoding`` needs of a ClipCaptionModel: the LM and its token embeddings."""

    def __init__(self, lm: Any):
        self.gpt = lm

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt.get_input_embeddings()(tokens)


def run_clipcap(lm: Any, prefix: torch.Tensor, beams: int, tokens: int, stepper: str) -> list[list[int]]:
    """The best caption's tokens per row, decoded by clipcap over ``stepper`` ("static" or "forward")."""
    opener = open_inference if stepper == "static" else (lambda m, rows, positions: ForwardStepper(m))
    original = decoding.open_inference
    decoding.open_inference = opener
    try:
        model = Caption(lm)
        if beams == 1:
            return [t for t, _ in decoding.greedy(model, prefix, tokens, STOP)]
        return [hyps[0][0] for hyps in decoding.beam_search(model, prefix, beams, tokens, STOP)]
    finally:
        decoding.open_inference = original


def run_generate(lm: Any, prefix: torch.Tensor, beams: int, tokens: int) -> list[list[int]]:
    """The LM's own ``generate`` on the same prefix embeddings; the new tokens up to the stop token (kept)."""
    out = lm.generate(
        inputs_embeds=prefix,
        max_new_tokens=tokens,
        do_sample=False,
        num_beams=beams,
        eos_token_id=STOP,
        pad_token_id=lm.config.pad_token_id,
    )
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(STOP) + 1] if STOP in row else row)
    return rows


def bench_family(family: str, args: argparse.Namespace) -> dict:
    lm = build(family, args.size)
    width = lm.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(args.batch, PREFIX_LENGTH, width, generator=g) * lm.get_input_embeddings().weight.std()
    stepper = type(open_inference(lm, args.batch, PREFIX_LENGTH + args.tokens)).__name__
    paths: dict[str, Callable[[torch.Tensor, int, int], list[list[int]]]] = {
        "static": lambda p, beams, n: run_clipcap(lm, p, beams, n, "static"),
        "forward": lambda p, beams, n: run_clipcap(lm, p, beams, n, "forward"),
        "generate": lambda p, beams, n: run_generate(lm, p, beams, n),
    }
    result: dict[str, Any] = {
        "stepper": stepper,
        "parameters_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 1),
    }
    for label, beams in (("greedy", 1), (f"beam{args.beam}", args.beam)):
        best = {name: float("inf") for name in paths}
        best_cpu = {name: float("inf") for name in paths}  # this process's CPU time: steadier on a shared machine
        found: dict[str, list[list[int]]] = {}
        with torch.inference_mode():
            for run in paths.values():  # warm-up: first-call allocations, lazy imports
                run(prefix[:2], beams, min(3, args.tokens))
            for _ in range(args.repeat):
                for name, run in paths.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    found[name] = run(prefix, beams, args.tokens)
                    best[name] = min(best[name], time.perf_counter() - start)
                    best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
                    print(f"{family} {label} {name}: {best[name]:.3f} s, {best_cpu[name]:.3f} s CPU", file=sys.stderr)
        new_tokens = sum(len(t) for t in found["generate"])
        result[label] = {
            name: {
                "seconds": round(best[name], 6),
                "tokens_per_s": round(new_tokens / best[name], 1),
                "x_generate": round(best["generate"] / best[name], 3),
                "cpu_seconds": round(best_cpu[name], 6),
                "x_generate_cpu": round(best_cpu["generate"] / best_cpu[name], 3),
            }
            for name in paths
        }
        result[label]["identical_to_generate"] = sum(a == b for a, b in zip(found["static"], found["generate"]))
        result[label]["identical_to_forward"] = sum(a == b for a, b in zip(found["static"], found["forward"]))
        result[label]["new_tokens"] = new_tokens
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="real configs or tiny ones (CI)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--batch", type=int, help="rows (images) per batch (default 8; tiny 3)")
    parser.add_argument("--tokens", type=int, help="new tokens per row, N (default 20; tiny 6)")
    parser.add_argument("--beam", type=int, default=5, help="beams for the beam rows (default 5)")
    parser.add_argument("--repeat", type=int, help="timed repeats; each path keeps its best (default 2; tiny 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_args()
    tiny = args.size == "tiny"
    args.batch = args.batch or (3 if tiny else 8)
    args.tokens = args.tokens or (6 if tiny else 20)
    args.repeat = args.repeat or (1 if tiny else 2)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}: choose from {', '.join(FAMILIES)}")
    load_start = os.getloadavg()[0]
    report: dict[str, Any] = {
        "size": args.size,
        "cpu": {"name": cpu_name(), **capability().as_dict()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "prefix_length": PREFIX_LENGTH,
        "tokens": args.tokens,
        "beam": args.beam,
        "families": {family: bench_family(family, args) for family in families},
    }
    report["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


def print_table(report: dict) -> None:
    cpu = report["cpu"]
    print(
        f"\n{report['size']} configs, random weights; B={report['batch']} rows, prefix K={report['prefix_length']} "
        f"random embeddings, {report['tokens']} new tokens; {cpu['name']} (torch: {cpu['isa']}, native bf16: "
        f"{cpu['native_bf16']}), {report['threads']} threads, torch {report['torch']}; load average "
        f"{report['load_average'][0]} at the start, {report['load_average'][1]} at the end. fp32, decoding only.\n"
    )
    print("| LM | decoding | path | s | tokens/s | x generate | CPU s | x generate (CPU) | identical tokens |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for family, res in report["families"].items():
        for label in (k for k in res if k.startswith(("greedy", "beam"))):
            row = res[label]
            for name, what in (
                ("generate", "own `generate`"),
                ("forward", "ForwardStepper"),
                ("static", res["stepper"]),
            ):
                same = {
                    "generate": "-",
                    "forward": f"{row['identical_to_forward']}/{report['batch']} to static",
                    "static": f"{row['identical_to_generate']}/{report['batch']} to generate",
                }[name]
                r = row[name]
                print(
                    f"| {family} | {label} | {what} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | "
                    f"{r['x_generate']:.2f}x | {r['cpu_seconds']:.3f} | {r['x_generate_cpu']:.2f}x | {same} |"
                )


if __name__ == "__main__":
    main()
