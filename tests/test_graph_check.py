"""CUDA graphs check themselves (inference.StaticGPT2): the first replay of each graph is compared with
the eager step, and a mismatch or a capture error turns the graphs off with one warning. Checked on
the CPU by injecting the graphed-step callable (``StaticGPT2.replay``)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap_cli.decoding.inference import GRAPHED_ATTR, GRAPHS_OFF_ATTR, StaticGPT2, open_inference


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _run(stepper: StaticGPT2, gpt, steps: int = 4, rows: int = 9) -> list[torch.Tensor]:
    """Prefill and ``steps`` steps (the rows shrink once, so a second bucket's graph is used); every logits."""
    g = torch.Generator().manual_seed(0)
    out = [stepper.prefill(torch.randn(rows, 4, 32, generator=g))]
    for i in range(steps):
        if i == 2:
            stepper.select(torch.arange(rows - 1))
        n = rows - (i >= 2)
        out.append(stepper.step(gpt.transformer.wte(torch.randint(0, 300, (n,), generator=g))))
    return out


def _eager(gpt) -> list[torch.Tensor]:
    return _run(StaticGPT2(gpt, rows=20, positions=20), gpt)


class Replay:
    """A graphed step that counts its calls; ``wrong`` adds an error, ``fails`` raises (a capture error)."""

    def __init__(self, stepper: StaticGPT2, wrong: float = 0.0, fails: bool = False):
        self.stepper, self.wrong, self.fails, self.calls = stepper, wrong, fails, 0

    def __call__(self, padded: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return self.stepper._fixed_blocks(padded, self.stepper._at) + self.wrong


def _graphed(gpt, **replay) -> tuple[StaticGPT2, Replay]:
    stepper = StaticGPT2(gpt, rows=20, positions=20, cuda_graphs=True)
    stepper.replay = Replay(stepper, **replay)
    return stepper, stepper.replay


def test_a_correct_graph_is_checked_once_per_bucket_and_kept(gpt, caplog):
    stepper, replay = _graphed(gpt)
    checked = []
    original = stepper._check_replay
    stepper._check_replay = lambda a, b: checked.append(a.shape[0]) or original(a, b)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="clipcap_cli"):
        got = _run(stepper, gpt)
    for a, b in zip(got, _eager(gpt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert replay.calls == 4 and stepper.replay is replay and caplog.records == []
    assert stepper._checked == {12, 8} and checked == [9, 8]  # 9 rows replay bucket 12's graph, then 8 rows bucket 8's


@pytest.mark.parametrize("kind", ["mismatch", "capture error"])
def test_a_wrong_or_failing_graph_falls_back_to_eager_with_one_warning(gpt, caplog, kind):
    stepper, replay = _graphed(gpt, **({"wrong": 0.5} if kind == "mismatch" else {"fails": True}))
    gpt.__dict__[GRAPHED_ATTR] = {"kept": stepper}
    with torch.inference_mode(), caplog.at_level("WARNING", logger="clipcap_cli"):
        got = _run(stepper, gpt)
    for a, b in zip(got, _eager(gpt)):  # every step's logits are the eager step's, the first one included
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert replay.calls == 1 and stepper.replay is None  # never replayed again
    [record] = caplog.records
    assert record.getMessage().startswith("CUDA graphs turned off")
    assert ("differ from the eager step's" if kind == "mismatch" else "RuntimeError") in record.getMessage()
    # The rest of the run: this model's later batches get the eager stepper, and no new warning.
    assert GRAPHS_OFF_ATTR in gpt.__dict__ and GRAPHED_ATTR not in gpt.__dict__
    later = open_inference(gpt, rows=3, positions=20, cuda_graphs=True)
    assert not later.graphed and later.replay is None


def test_a_tiny_difference_is_within_tolerance(gpt, caplog):
    stepper, replay = _graphed(gpt, wrong=1e-6)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="clipcap_cli"):
        _run(stepper, gpt)
    assert caplog.records == [] and stepper.replay is replay and replay.calls == 4


def test_only_graphed_cuda_steppers_replay(gpt):
    """On the CPU the fixed-shape step runs eagerly (how the tests check its math); eager steppers never replay."""
    assert StaticGPT2(gpt, rows=4, positions=20, cuda_graphs=True).replay is None
    assert StaticGPT2(gpt, rows=4, positions=20).replay is None
