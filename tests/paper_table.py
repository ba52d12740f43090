"""The ClipCap paper's Table 1 (COCO, Karpathy test split; BLEU-4, METEOR, CIDEr, SPICE, x100),
typed in from the paper (arXiv 2111.09734 v1, Table 1), not copied from clipcap_cli.eval.metrics, so
that the tests catch a wrong number there. Row names are clipcap's."""

PAPER_TABLE1 = {
    "transformer_frozen_gpt2": {"BLEU-4": 33.53, "METEOR": 27.45, "CIDEr": 113.08, "SPICE": 21.05},
    "mlp_gpt2_tuning": {"BLEU-4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12},
    "ablation_transformer_gpt2_tuning": {"BLEU-4": 32.22, "METEOR": 27.79, "CIDEr": 109.83, "SPICE": 20.63},
    "ablation_mlp_frozen_gpt2": {"BLEU-4": 27.39, "METEOR": 24.4, "CIDEr": 92.38, "SPICE": 18.04},
}
