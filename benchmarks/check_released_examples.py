"""Caption the original README's example photos with the released weights and compare with the captions
the original README shows (a regression check for a machine that can download the weights).

    python benchmarks/check_released_examples.py                       # all 12 README photos, greedy and beam 5
    python benchmarks/check_released_examples.py --images DIR --device cuda

COCO_* photos are captioned with `coco`, CONCEPTUAL_* with `conceptual`. The original ran CLIP in fp16 on
a GPU and did not say which decoder made the README captions, so an exact match needs a GPU, and either
decoder may be the one that matches; on CPU expect small drift. Prints one line per photo and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE / "data" / "readme-photos"  # the original README's 12 photos and their captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--captions", type=Path, default=None, help="JSON with {'captions': {file: caption}}")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import clipcap_cli

    captions_file = args.captions or args.images / "original_captions.json"
    expected: dict[str, str] = json.loads(captions_file.read_text())["captions"]
    matches = total = 0
    for model_name, prefix in (("coco", "COCO_"), ("conceptual", "CONCEPTUAL_")):
        photos = sorted(p for p in args.images.glob(f"{prefix}*.jpg") if p.name in expected)
        if not photos:
            continue
        model = clipcap_cli.load_model(model_name, device=args.device)
        greedy = model.caption(photos)
        beam = model.caption(photos, strategy="beam", beam_size=5)
        for photo, g, b in zip(photos, greedy, beam):
            want = expected[photo.name]
            hit = want in (g.text, b.text)
            matches += hit
            total += 1
            print(
                f"{'OK  ' if hit else 'DIFF'} {photo.name}\n     original: {want}\n     greedy:   {g.text}\n     beam 5:   {b.text}"
            )
    print(f"{matches}/{total} photos match the original README's caption (greedy or beam 5)")
    return 0 if total and matches == total else 1


if __name__ == "__main__":
    sys.exit(main())
