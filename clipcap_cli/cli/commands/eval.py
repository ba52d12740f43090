"""`clipcap eval`: COCO caption metrics for a predictions file, or for a model run on the reference images."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.cli.commands.options import DeviceOption, ImageWorkersOption, JsonOption, PrecisionOption
from clipcap_cli.cli.ui import complete_model
from clipcap_cli.decoding.decode import DecodingOptions
from clipcap_cli.eval.clipscore import METRIC_NAMES as CLIP_METRICS
from clipcap_cli.eval.evaluation import EvalOptions

HELP = """Score captions with the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE), computed as pycocoevalcap does, and with CLIPScore and RefCLIPScore.

[bold]References[/] (--refs): COCO captions_val2014.json, the Karpathy split file dataset_coco.json (--split, default test), a features store from `clipcap extract`, or JSON Lines (image, path or image_id + caption; one line per caption).

[bold]Predictions[/]: --predictions FILE (`clipcap caption --jsonl` output, or the COCO results format \\[{"image_id", "caption"}]), or --model NAME|PATH to caption the reference images (found under --images) and score them in one run; --save-predictions keeps those captions for re-scoring. With a features store as --refs, --model captions its stored CLIP embeddings (no image files needed) unless --images is given.

[bold]Matching[/]: by COCO image id when both sides have one (an image_id field, or a file name like COCO_val2014_000000123456.jpg or 000000123456.jpg); otherwise by path, compared on trailing components (/data/val2014/x.jpg matches val2014/x.jpg; x.jpg matches it when the name is unique). Reference images without a prediction, or predictions without references, are an error (exit 2) unless --allow-missing. Prediction records with an "error" (images that failed) are reported and not scored: the other images are scored and the exit code is 3. An empty caption is scored (as zero).

[bold]Output[/]: a table on a terminal (scores x100, as papers print them); JSON on stdout when piped or with --json: {metrics, scale, counts, tokenizer, backends, unavailable, notes, matched_by, settings} plus per_image / paper when asked; values on pycocoevalcap's 0-1 scale (CIDEr about 1.1 for a good COCO model). METEOR and SPICE need Java and the eval extra; when they cannot run they are listed as unavailable with the reason.

[bold]CLIPScore[/] and [bold]RefCLIPScore[/] (Hessel et al., 2021; computed as jmhessel/clipscore does, on its 0-2.5 scale): how well CLIP matches each caption to its image ("A photo depicts " + caption), and its harmonic mean with the closest reference. They need the images: --images DIR, a features store (its stored embeddings when they come from the same CLIP, else its image files) or a --model run; otherwise they are listed as unavailable. CLIP: --clip (default ViT-B-32 with OpenAI's weights, as the CLIPScore paper).

Example: [bold]clipcap eval --refs captions_val2014.json --predictions captions.jsonl --images val2014/ --metrics CLIPScore,RefCLIPScore[/]

Example: [bold]clipcap eval --refs dataset_coco.json --split test --images val2014/ --model coco --beam 5[/]

Example: [bold]clipcap eval --refs captions_val2014.json --predictions captions.jsonl --metrics BLEU,CIDEr --per-image[/]
"""

D = EvalOptions()
DECODING = DecodingOptions()
INPUTS = "Inputs"
MODEL = "Captioning with --model"
SCORING = "Scoring"
OUTPUT = "Output"


def command(
    refs: Annotated[
        Path,
        typer.Option(
            "--refs",
            "-r",
            help="Reference captions: COCO captions file, Karpathy split file, features store or JSON Lines.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ],
    predictions: Annotated[
        Optional[Path],
        typer.Option(
            "--predictions",
            "-p",
            help="Predicted captions: `clipcap caption --jsonl` output or COCO results JSON.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="Caption the reference images with this model (registry name or checkpoint) and score them.",
            autocompletion=complete_model,
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    refs_format: Annotated[
        str,
        typer.Option(
            "--refs-format", help="auto, coco, karpathy, caption-list, features or jsonl.", rich_help_panel=INPUTS
        ),
    ] = D.refs_format,
    split: Annotated[
        Optional[str],
        typer.Option(
            help=f"Karpathy split file: the split to score (train, val, test, restval, all) \\[default: {D.split}].",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    images: Annotated[
        Optional[Path],
        typer.Option(
            "--images",
            "-i",
            help="Folder of the reference images, for --model and CLIPScore (--model's default: the features store's root or the refs file's folder).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    beam: Annotated[
        Optional[int],
        typer.Option(
            "--beam",
            metavar="N",
            help="Beam search with N beams (5 is the original's beam width) \\[default: greedy, as the original's predict.py].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    max_length: Annotated[
        Optional[int],
        typer.Option(
            "--max-length",
            help=f"Most tokens per caption \\[default: {DECODING.max_length}].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per captioning batch \\[default: as clipcap caption, for the device].",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    precision: PrecisionOption = None,
    workers: ImageWorkersOption = None,
    device: DeviceOption = D.device,
    save_predictions: Annotated[
        Optional[Path],
        typer.Option(
            "--save-predictions",
            metavar="FILE",
            help="Write the model's captions as JSON Lines (re-score them with --predictions).",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    metric_names: Annotated[
        Optional[str],
        typer.Option(
            "--metrics",
            help="Comma-separated subset: BLEU (all four), BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE, CLIPScore, RefCLIPScore \\[default: all].",
            show_default=False,
            rich_help_panel=SCORING,
        ),
    ] = None,
    tokenizer: Annotated[
        str,
        typer.Option(
            help="auto (Java PTBTokenizer when available, else its Python imitation), ptb-java, ptb-python or none.",
            rich_help_panel=SCORING,
        ),
    ] = D.tokenizer,
    backend: Annotated[
        str,
        typer.Option(
            help="auto, python (no Java: METEOR/SPICE unavailable) or pycocoevalcap (its Python scorers too).",
            rich_help_panel=SCORING,
        ),
    ] = D.backend,
    clip: Annotated[
        Optional[str],
        typer.Option(
            "--clip",
            help=f"CLIP for CLIPScore/RefCLIPScore: open_clip name or local-dir:PATH \\[default: {D.clip_model}].",
            show_default=False,
            rich_help_panel=SCORING,
        ),
    ] = None,
    clip_pretrained: Annotated[
        Optional[str],
        typer.Option(
            "--clip-pretrained",
            help="open_clip pretrained tag of --clip \\[default: openai where --clip has it, else its only tag; none for local-dir:].",
            show_default=False,
            rich_help_panel=SCORING,
        ),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Score the images both sides share instead of failing on a mismatch.",
            rich_help_panel=SCORING,
        ),
    ] = D.allow_missing,
    per_image: Annotated[
        bool,
        typer.Option(
            "--per-image", help="Per-image scores (JSON: a list; terminal: the worst images).", rich_help_panel=OUTPUT
        ),
    ] = D.per_image,
    compare: Annotated[
        Optional[str],
        typer.Option(
            help="'paper': the ClipCap paper's Table 1 (COCO) rows beside ours, x100.",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    json_: JsonOption = False,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Also write the JSON report to FILE.",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT)] = False,
) -> None:
    from clipcap_cli.cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.errors import UsageError
        from clipcap_cli.eval import evaluation

        if (predictions is None) == (model is None):
            raise UsageError("give one of --predictions FILE or --model NAME|PATH")
        model_only = {
            "--beam": beam,
            "--max-length": max_length,
            "--batch-size": batch_size,
            "--workers": workers,
            "--precision": precision,
            "--save-predictions": save_predictions,
        }
        given = [flag for flag, value in model_only.items() if value is not None]
        if predictions is not None and given:
            raise UsageError(
                f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --model (it sets how the references are captioned)"
            )
        from clipcap_cli.fsutil import refuse_inputs

        read = [p for p in (refs, predictions) if p is not None]
        for flag, path in (("--save-predictions", save_predictions), ("--output", output)):
            if path is not None and path.is_dir():
                raise UsageError(f"{flag} {path} is a folder: give a file name")
            refuse_inputs(path, read, flag)
        if save_predictions is not None and output is not None:
            refuse_inputs(output, [save_predictions], "--output")
        if compare is not None and compare.strip().lower() != "paper":
            raise UsageError(f"--compare {compare}: the only comparison is 'paper'")
        options = EvalOptions(
            refs_format=refs_format,
            split=split or D.split,
            metrics=_parse_metrics(metric_names),
            tokenizer=tokenizer,
            backend=backend,
            allow_missing=allow_missing,
            per_image=per_image,
            batch_size=batch_size if batch_size is not None else D.batch_size,
            precision=precision or D.precision,
            workers=workers if workers is not None else D.workers,
            device=device,
            **_clip_options(clip, clip_pretrained),
        )
        evaluation.check_scorers(options)
        if (clip, clip_pretrained) != (None, None) and set(evaluation.requested_metrics(options.metrics)) & set(
            CLIP_METRICS
        ):
            from clipcap_cli.eval.clipscore import check_clip

            check_clip(options.clip_model, options.clip_pretrained)  # a typo fails before any captioning
        decoding = _decoding(beam, max_length)  # checked before reading anything
        references = evaluation.read_references(refs, refs_format, split, images)
        _say_refs(references)
        settings: dict[str, Any] = {}
        if model is not None:
            preds = _caption(references, model, images, decoding, options, quiet)
            settings = {
                "model": model,
                "decoding": evaluation.decoding_settings(decoding),
                "batch_size": options.batch_size,
                "device": options.device,
                "precision": options.precision,
            }
            if save_predictions is not None:
                from clipcap_cli.cli.ui import stderr
                from clipcap_cli.eval.captioning import write_predictions

                write_predictions(save_predictions, preds)
                stderr.print(f"wrote {len(preds.items)} captions to {save_predictions}", highlight=False)
                settings["save_predictions"] = str(save_predictions)
        else:
            assert predictions is not None
            preds = evaluation.read_predictions(predictions)
        with _clip_progress(quiet) as clip_progress:
            report = evaluation.evaluate(
                references,
                preds,
                options,
                settings=settings,
                compare_paper=compare is not None,
                clip_progress=clip_progress,
            )
        _emit(report, output, json_, options.worst)


def _parse_metrics(text: str | None) -> tuple[str, ...] | None:
    """--metrics "BLEU,CIDEr" -> ("BLEU", "CIDEr"); EvalOptions checks the names."""
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _clip_options(clip: str | None, pretrained: str | None) -> dict[str, Any]:
    """EvalOptions' CLIP fields: --clip (default ViT-B-32) and its tag (openai by default; none
    for a local-dir: model, which has its weights in its folder)."""
    if clip is None and pretrained is None:
        return {}
    model = clip or D.clip_model
    from clipcap_cli.weights.clip_tower import LOCAL_DIR, default_clip_tag

    return {
        "clip_model": model,
        "clip_pretrained": pretrained
        if pretrained is not None
        else None
        if model.startswith(LOCAL_DIR)
        else D.clip_pretrained
        if clip is None
        else default_clip_tag(model),
    }


@contextlib.contextmanager
def _clip_progress(quiet: bool) -> Any:
    """A progress bar that appears only if CLIPScore reads image files."""
    from clipcap_cli.cli import ui

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = ui.item_progress("images", quiet)
            state["bar"].start()
            state["task"] = state["bar"].add_task("CLIPScore", total=total)
        state["bar"].update(state["task"], completed=done)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()


def _decoding(beam: int | None, max_length: int | None) -> DecodingOptions:
    from clipcap_cli.cli.ui import as_flags
    from clipcap_cli.errors import UsageError

    try:
        options = DecodingOptions()
        if beam is not None:
            options = options.replace(strategy="beam", beam_size=beam)
        if max_length is not None:
            options = options.replace(max_length=max_length)
    except UsageError as exc:
        raise as_flags(exc) from None
    return options


def _say_refs(references: Any) -> None:
    from clipcap_cli.cli.ui import say

    split = f" (split {references.split})" if references.split else ""
    say(
        f"references: {references.format} {references.source}{split}: {len(references.images)} images, "
        f"{sum(len(r.captions) for r in references.images)} captions"
        + (f"; {references.without_captions} images without captions left out" if references.without_captions else "")
    )


def _caption(
    references: Any, model: str, images: Path | None, decoding: DecodingOptions, options: EvalOptions, quiet: bool
) -> Any:
    from clipcap_cli.cli.ui import item_progress, stderr
    from clipcap_cli.eval.captioning import caption_references

    progress = item_progress("images", quiet)
    task = progress.add_task("loading model", total=None)
    progress.start()
    try:
        preds = caption_references(
            references,
            model,
            images_root=images,
            decoding=decoding,
            batch_size=options.batch_size,
            device=options.device,
            precision=options.precision,
            allow_missing=options.allow_missing,
            workers=options.workers,
            on_start=lambda total: progress.reset(task, description="captioning", total=total),  # clock from here
            on_progress=lambda done: progress.update(task, completed=done),
        )
    except KeyboardInterrupt:
        progress.stop()
        stderr.print("[red]interrupted[/]: nothing was scored")
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    return preds


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _emit(report: dict, output: Path | None, json_: bool, worst: int) -> None:
    from rich.markup import escape

    from clipcap_cli.cli.ui import stderr, warn
    from clipcap_cli.errors import EXIT_PARTIAL
    from clipcap_cli.eval import evaluation
    from clipcap_cli.fsutil import write_text_atomic

    text = evaluation.report_json(report)
    if output is not None:
        write_text_atomic(output, text + "\n")
        stderr.print(f"wrote the report to {output}", highlight=False)
    as_json = json_ or not _is_terminal()
    if as_json:
        print(text)
        for name, reason in report["unavailable"].items():
            warn(escape(f"{name} unavailable: {reason}"))
    else:
        from clipcap_cli.cli.commands.eval_table import render

        render(report, worst)
    if report["counts"]["failed_predictions"]:
        warn(escape(next(note for note in report["notes"] if note.startswith(evaluation.FAILED_NOTE))))
        raise typer.Exit(EXIT_PARTIAL)
