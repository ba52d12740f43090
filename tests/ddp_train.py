"""A torchrun entry for test_train_ddp.py: `clipcap train` with a probe callback on every process.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py PROBE_DIR [FAIL_AT] train --data ...

The probe records, on each rank, the caption ids it trained on and a hash of its final weights
(PROBE_DIR/rank{N}.json). With FAIL_AT = "step:N", rank 0's probe raises at step N instead.
The rest of the command line is `clipcap`'s, run as it is; only the probe is added to its callback.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from clipcap_cli import train as core


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Probe(core.TrainCallback):
    all_ranks = True  # every process reports its own data and weights

    def __init__(self, folder: Path, fail_at: str | None):
        self.folder = folder
        self.fail_step = int(fail_at.split(":")[1]) if fail_at else None
        self.ids: list[int] = []

    @property
    def rank(self) -> int:  # the process group exists once training has started
        return torch.distributed.get_rank()

    def on_step(self, info: core.StepInfo) -> None:
        if info.step == self.fail_step and self.rank == 0:
            raise RuntimeError(f"probe: rank 0 gives up at step {info.step}")
        self.ids.extend(info.caption_ids.tolist())

    def on_end(self, result: core.TrainResult, model: torch.nn.Module) -> None:
        info = {
            "rank": self.rank,
            "world_size": torch.distributed.get_world_size(),
            "step": result.step,
            "indices": self.ids,
            "weights_sha256": weights_hash(model),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{self.rank}.json").write_text(json.dumps(info))


def main() -> None:
    folder, args = Path(sys.argv[1]), sys.argv[2:]
    fail_at = args.pop(0) if args and args[0].startswith("step:") else None
    real_train = core.train

    def train_with_probe(*a, callback=None, **kw):
        return real_train(*a, callback=[callback, Probe(folder, fail_at)], **kw)

    core.train = train_with_probe  # what `clipcap train` calls
    from clipcap_cli.cli.app import app

    app(args=args, prog_name="clipcap")


if __name__ == "__main__":
    main()
