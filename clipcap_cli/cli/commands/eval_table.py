"""`clipcap eval`'s report on a terminal: rich tables of the scores and of the worst images."""

from __future__ import annotations

from pathlib import Path

from clipcap_cli.eval.clipscore import METRIC_NAMES as CLIP_METRICS

# Short column titles for the paper's Table 1 rows (metrics.PAPER_TABLE1_COCO keys).
PAPER_COLUMNS = {
    "transformer_frozen_gpt2": "paper: Transformer,\nfrozen GPT-2",
    "mlp_gpt2_tuning": "paper: MLP +\nGPT-2 tuning",
    "ablation_transformer_gpt2_tuning": "ablation: Transformer\n+ GPT-2 tuning",
    "ablation_mlp_frozen_gpt2": "ablation: MLP,\nfrozen GPT-2",
}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(report: dict, worst: int) -> None:
    """The report as tables on stdout: the scores (x100 and as computed, the paper's rows beside them when asked),
    what was unavailable and why, the notes, and the lowest-scoring images."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from clipcap_cli.cli.ui import stdout
    from clipcap_cli.eval import evaluation, metrics

    counts = report["counts"]
    settings = report["settings"]
    what = settings["refs_format"] + (f" {settings['split']}" if settings.get("split") else "")
    source = f"model {settings['model']}" if settings.get("model") else Path(settings["predictions"] or "").name
    table = Table(
        title=f"{escape(source)}: {counts['images']} images, {counts['reference_captions']} reference captions ({what})",
        caption=f"x100 = the papers' scale; JSON holds the unscaled values. Tokenizer: {report['tokenizer']}.",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("x100", justify="right", style="bold")
    table.add_column("value", justify="right", style="dim")
    paper = report.get("paper")
    if paper:
        for row in paper["rows"]:
            table.add_column(PAPER_COLUMNS.get(row, row.replace("_", " ")), justify="right")
    requested = [
        m for m in (*metrics.METRIC_NAMES, *CLIP_METRICS) if m in report["metrics"] or m in report["unavailable"]
    ]
    for name in requested:
        value = report["metrics"].get(name)
        cells = [
            name,
            _fmt(None if value is None else value * metrics.PAPER_SCALE),
            "n/a" if value is None else f"{value:.4f}",
        ]
        if paper:
            cells += [_fmt(values.get(name)) for values in paper["rows"].values()]
        table.add_row(*cells)
    stdout.print(table)
    for name, reason in report["unavailable"].items():
        stdout.print(f"[yellow]{name} unavailable:[/] {escape(reason)}", highlight=False)
    for note in report["notes"]:
        stdout.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    if paper and paper.get("note"):
        stdout.print(f"[dim]note: {escape(paper['note'])}[/]", highlight=False)
    metric, rows = evaluation.worst_images(report, worst)
    if rows:
        worst_table = Table(title=f"The {len(rows)} lowest {metric} images", title_justify="left")
        worst_table.add_column("image", overflow="fold")
        for name in ("CIDEr", "BLEU-4"):
            if name in rows[0]["scores"]:
                worst_table.add_column(name, justify="right")
        worst_table.add_column("caption", overflow="fold")
        worst_table.add_column("a reference", overflow="fold", style="dim")
        for row in rows:
            image = row["image"] or f"image_id {row['image_id']}"
            scores = [f"{row['scores'][name]:.3f}" for name in ("CIDEr", "BLEU-4") if name in row["scores"]]
            worst_table.add_row(Text(image), *scores, Text(row["caption"]), Text(row["references"][0]))
        stdout.print(worst_table)
