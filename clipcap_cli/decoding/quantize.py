"""int8 on the CPU (``--precision int8``): dynamic quantisation of a module's linear layers, in one function.

The route was chosen by measurement (issue 24, torch 2.14.1, an AVX2-only EPYC, one linear layer
against fp32): torch's built-in ``quantize_dynamic`` (fbgemm/x86 kernels) ran 1.2x at decoding
shapes, 3.1x on GPT-2's LM head and 1.9x at CLIP's shapes; torchao's int8 configs ran 0.03-0.99x.
torch marks ``torch.ao.quantization`` deprecated: its two deprecation warnings are silenced here,
around this call only. When torch removes it, this function is the one place to change, and
``benchmarks/bench_precision.py`` re-measures the choice: its int8 routes (``benchmarks/int8_routes.py``)
time torch's route, onnxruntime's int8 kernels (on an AVX512-VNNI EPYC: faster on one thread, mixed
on two, with about half the error: the likeliest successor) and torchao's, on one linear layer.

Weights are quantised per output channel (symmetric int8), activations per batch, at run time
(dynamic: no calibration data). Everything that is not an exact ``nn.Linear`` (or transformers'
``Conv1D``, GPT-2's linear layer with its weight stored transposed) stays as it is: LayerNorms,
embeddings, convolutions, and ``nn.MultiheadAttention`` (which reads its projections' weights
itself). torch is imported inside functions.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# The two warnings torch gives for this API today; nothing else is silenced.
DEPRECATION_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


def quantize_int8(module: nn.Module) -> nn.Module:
    """Quantise ``module``'s linear layers to dynamic int8, in place (CPU only); returns ``module``.

    GPT-2's ``Conv1D`` layers become ``nn.Linear`` with the transposed weight first (the same
    function: y = x W + b), then every exact ``nn.Linear`` becomes torch's dynamically quantised
    Linear. A tied LM head gets its own int8 copy; the embedding keeps the fp32 weight.
    """
    import torch
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if any(p.device.type != "cpu" for p in module.parameters()):
        raise ValueError("int8 quantisation runs on the CPU only")
    conv1d_to_linear(module)
    with warnings.catch_warnings():
        for message in DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return module


def conv1d_to_linear(module: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` under ``module`` by the equal ``nn.Linear``, in place."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv1D:
                n_in, n_out = child.weight.shape  # Conv1D keeps (in, out): y = x @ W + b
                linear = nn.Linear(n_in, n_out, bias=child.bias is not None, device="meta")
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                linear.train(child.training)
                setattr(parent, name, linear)
    return module


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds any dynamically quantised linear layer (``quantize_int8`` ran on it)."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return any(isinstance(m, QLinear) for m in module.modules())
