"""Detect objects in your own images with a CORA checkpoint and a vocabulary of your choice.

    bash demo.sh                                        # the bundled miniature model on toy images (below)
    bash demo.sh --custom_vocabulary "heart,star,ring"  # the same, your words
    bash demo.sh --input my.jpg photos/ "shots/*.png" --custom_vocabulary "cat,remote control" \\
                 --resume /path/to/checkpoint.pth --output outputs/demo
    python demo.py --dataset --coco_path data/coco --num_images 50 --resume /path/to/checkpoint.pth

Flags follow Detic's demo (`--input`, `--output`, `--vocabulary`, `--custom_vocabulary`,
`--confidence-threshold`); the checkpoint is `--resume` and the CLIP archive `--model_path`, as
in main.py. For every input an annotated PNG is written to `--output` (boxes, "name score" labels,
one colour per class), and all detections go to `<output>/detections.json`, a list in COCO
results style: `image_id`, `file_name`, `bbox` [x, y, w, h] in pixels of the image as displayed
(EXIF orientation applied), `score`, `category_name`, and `category_id` for the COCO / LVIS
vocabularies and `--dataset`.

Without a checkpoint (no `--resume`, no $CORA_CHECKPOINT, no checkpoints/cora_rn50.pth) and without
`--input`, the demo runs the model trained by tools/toy/run_all.sh on the miniature world
(`assets/toy/cora_toy.pth`) on toy scenes (`assets/toy/samples/`) with its 16 class names, four of
which it never saw a box of; a published CORA checkpoint is needed for real photos.

`--dataset` draws the first `--num_images` images of a COCO-format val split (`--coco_path`:
`val2017/` and `annotations/`) with their detections for the split's own categories, as the
original's demo.py does, and (`--show_gt`) their ground-truth boxes.
"""
from __future__ import annotations

import argparse
import colorsys
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SAMPLES_DIR = ROOT / "assets" / "samples"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "cora_rn50.pth"
# tools/toy/run_all.sh, then tools/toy/bundle.py: the localizer without CLIP, the toy CLIP archive, its region prompt
TOY_CHECKPOINT = ROOT / "assets" / "toy" / "cora_toy.pth"
TOY_CLIP = ROOT / "assets" / "toy" / "clip_toy.pt"
TOY_PROMPT = ROOT / "assets" / "toy" / "region_prompt_toy.pth"
TOY_SAMPLES_DIR = ROOT / "assets" / "toy" / "samples"
CHECKPOINT_ENV = "CORA_CHECKPOINT"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ORIGINAL_REPOSITORY = "https://github.com/tgxs002/CORA"
# The original README's Model Zoo (COCO OVD, novel AP50).
PUBLISHED_CHECKPOINTS = (
    ("CLIP RN50, novel AP50 35.1", "https://drive.google.com/file/d/1lQmFrbfaZutlA72gi-VOAHOvGuHSYMbo/view"),
    ("CLIP RN50x4, novel AP50 41.7", "https://drive.google.com/file/d/115osjVyv86vjG_b0W83vPQryXxdIDsv_/view"),
)
# COCO category ids of the 65 COCO-OVD classes, in the order of models.prematch.COCO_OVD_CATEGORIES.
COCO_OVD_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 38,
    41, 42, 44, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 59, 60, 61, 62, 63, 65, 70, 72, 73, 74, 75, 76, 78,
    79, 80, 81, 82, 84, 85, 86, 87, 90,
)
OVD_VAL_JSONS = ("instances_val2017_basetarget.json", "instances_val2017.json")


class DemoError(Exception):
    """A problem with the command line or the files it names; printed without a traceback."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="CORA open-vocabulary detection on your images (writes annotated PNGs and detections.json)")
    p.add_argument("--input", nargs="+", default=None,
                   help="image files, directories (their images, not recursive) and globs; default: "
                        f"{SAMPLES_DIR.relative_to(ROOT)}, or {TOY_SAMPLES_DIR.relative_to(ROOT)} for the bundled "
                        "miniature model")
    p.add_argument("--output", default="outputs/demo",
                   help="folder for the annotated PNGs and detections.json (default %(default)s)")
    p.add_argument("--vocabulary", choices=("coco", "lvis", "custom"), default=None,
                   help="coco: the 65 COCO-OVD classes; lvis: the 1203 LVIS classes (needs --lvis_json); "
                        "custom: --custom_vocabulary. Default: custom when --custom_vocabulary is given, else coco")
    p.add_argument("--custom_vocabulary", "--custom-vocabulary", default="",
                   help='comma-separated class names or phrases, e.g. "cat,remote control"')
    p.add_argument("--lvis_json", "--lvis-json", default="",
                   help="an LVIS v1 annotation json (e.g. lvis_v1_val.json): category names and rare classes")
    p.add_argument("--confidence-threshold", "--confidence_threshold", dest="confidence_threshold", type=float,
                   default=0.2,
                   help="report and draw detections scoring at least this (default %(default)s, as the original demo)")
    p.add_argument("--max-detections", "--max_detections", dest="max_detections", type=int, default=100,
                   help="detections per image kept by the post-processing, before the threshold (default %(default)s)")
    p.add_argument("--resume", default="",
                   help=f"CORA checkpoint; default ${CHECKPOINT_ENV} or {DEFAULT_CHECKPOINT.relative_to(ROOT)}")
    p.add_argument("--model_path", "--model-path", default="",
                   help="OpenAI CLIP archive (RN50.pt, ...); only for a checkpoint without CLIP weights")
    p.add_argument("--region_prompt_path", "--region-prompt-path", default="",
                   help="region prompt file; only for a checkpoint without CLIP weights")
    p.add_argument("--device", default="", help="cuda, cuda:1, cpu, ... (default cuda when available, else cpu)")
    p.add_argument("--cpu", action="store_true", help="same as --device cpu")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                   help="images per forward pass (default %(default)s); more pads images of different sizes, "
                        "which changes their scores slightly")
    p.add_argument("--text_cache_dir", "--text-cache-dir", default="",
                   help="where text embeddings are cached (default ~/.cache/cora/text_embeddings)")
    p.add_argument("--no_text_cache", "--no-text-cache", action="store_true",
                   help="do not read or write the text-embedding disk cache")
    p.add_argument("--dataset", action="store_true",
                   help="draw the first --num_images images of a COCO-format val split instead of --input")
    p.add_argument("--coco_path", "--coco-path", default="data/coco",
                   help="--dataset: folder with val2017/ and annotations/ (default %(default)s)")
    p.add_argument("--dataset_json", "--dataset-json", default="",
                   help=f"--dataset: annotation json (default: annotations/{OVD_VAL_JSONS[0]}, "
                        f"else annotations/{OVD_VAL_JSONS[1]})")
    p.add_argument("--num_images", "--num-images", type=int, default=50,
                   help="--dataset: how many images (default %(default)s)")
    p.add_argument("--show_gt", "--show-gt", action="store_true", help="--dataset: also draw ground-truth boxes")
    return p


# ------------------------------------------------------------------ inputs, vocabulary, checkpoint
def collect_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files as given (any extension), directories' image files (sorted) and glob matches (image files,
    sorted), duplicates removed keeping the first."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise DemoError(f"--input {pattern}: the directory holds no image files "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            images = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not images:
                raise DemoError(f"--input {pattern!r}: the pattern matches no image files "
                                f"({len(matches)} matches in all)")
            found.extend(images)
        else:
            raise DemoError(f"--input {pattern}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def resolve_checkpoint(resume: str, *, toy_allowed: bool = False) -> tuple[Path, bool]:
    """The checkpoint to run and whether it is the bundled miniature model (only when `toy_allowed`: no
    --input, no --dataset, and no CORA checkpoint given or found)."""
    if resume:
        path = Path(resume)
        if not path.is_file():
            raise DemoError(f"--resume {resume}: checkpoint file not found")
        return path, False
    default = Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT)
    if default.is_file():
        return default, False
    if toy_allowed and CHECKPOINT_ENV not in os.environ and TOY_CHECKPOINT.is_file():
        return TOY_CHECKPOINT, True
    links = "\n".join(f"    {name}: {url}" for name, url in PUBLISHED_CHECKPOINTS)
    raise DemoError(
        f"no CORA checkpoint: --resume was not given and the default checkpoint {default} does not exist "
        f"(${CHECKPOINT_ENV} overrides that path).\n"
        f"cora bundles only a miniature model of toy shapes ({TOY_CHECKPOINT.relative_to(ROOT)}: `bash demo.sh` "
        f"without --input shows it); for photos use a published CORA checkpoint (COCO OVD), linked from the "
        f"Model Zoo of {ORIGINAL_REPOSITORY} (README):\n{links}\n"
        f"Download one, then either save it as {default} or pass it:\n"
        f"    bash demo.sh --resume /path/to/checkpoint.pth [--input my.jpg --custom_vocabulary \"cat,remote control\"]"
    )


def lvis_vocabulary(path: str) -> tuple[list[str], list[int], list[int]]:
    """(names with '_' as spaces, sorted by id; category ids; indices of the rare classes)."""
    if not path:
        raise DemoError("--vocabulary lvis needs the LVIS v1 category list, which cora does not bundle: pass "
                        "--lvis_json /path/to/lvis_v1_val.json (LVIS v1 annotations, https://www.lvisdataset.org)")
    if not Path(path).is_file():
        raise DemoError(f"--lvis_json {path}: file not found")
    try:
        with open(path) as f:
            categories = json.load(f)["categories"]
        categories = sorted(categories, key=lambda c: c["id"])
        names = [c["name"].replace("_", " ") for c in categories]
        ids = [int(c["id"]) for c in categories]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DemoError(f"--lvis_json {path}: expected an LVIS json with 'categories' [{{'id', 'name', "
                        f"'frequency'}}, ...] ({type(e).__name__}: {e})") from e
    rare = [i for i, c in enumerate(categories) if c.get("frequency") == "r"]
    return names, ids, rare


def choose_vocabulary(args) -> tuple[list[str], list[int] | None, list[int] | None]:
    """`(names, category ids or None, indices boosted by target_class_factor or None)`."""
    from models.predictor import normalize_vocabulary
    from models.prematch import COCO_OVD_CATEGORIES

    kind = args.vocabulary or ("custom" if args.custom_vocabulary else "coco")
    if args.custom_vocabulary and kind != "custom":
        raise DemoError(f"--custom_vocabulary was given with --vocabulary {kind}; use one of them")
    if kind == "coco":
        return list(COCO_OVD_CATEGORIES), list(COCO_OVD_CATEGORY_IDS), None
    if kind == "lvis":
        names, ids, rare = lvis_vocabulary(args.lvis_json)
        return names, ids, rare
    if not args.custom_vocabulary.strip():
        raise DemoError('--vocabulary custom needs --custom_vocabulary "name1,name2,..."')
    try:
        return list(normalize_vocabulary(args.custom_vocabulary.split(","))), None, None
    except ValueError as e:
        raise DemoError(f"--custom_vocabulary {args.custom_vocabulary!r}: {e}") from e


# ------------------------------------------------------------------ drawing
PALETTE_SIZE = 20


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class `index`: a fixed palette of 20 (10 hues, bright then dark), consecutive
    indices 7/10 of the hue circle apart; class i and i + 20 share a colour."""
    k = index % PALETTE_SIZE
    hue = ((k * 7) % 10) / 10
    value = 0.95 if k < 10 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 bundles a scalable font
    except TypeError:
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def drawing_sizes(width: int, height: int) -> tuple[int, int]:
    """(box line width, label font size) for an image: readable when the image is shown at ~800 px."""
    short = min(width, height)
    return max(2, round(short / 250)), max(12, round(short / 32))


def annotate(image, boxes, labels, names, scores, *, gt_boxes=None):
    """Draw detections on a copy of an RGB PIL image.

    boxes: `[K,4]` xyxy pixels; labels: class indices (colour); names, scores: the label text.
    Lower scores are drawn first so the best detections stay on top; labels are kept inside the image.
    Returns `(annotated image, regions)`, regions: per detection the `(x0, y0, x1, y1)` pixel rectangle
    (inclusive) that contains everything drawn for it (box outline and label).
    """
    from PIL import ImageDraw

    out = image.copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line, font_size = drawing_sizes(width, height)
    font = _font(font_size)
    pad = max(1, font_size // 6)
    if gt_boxes is not None:
        for x0, y0, x1, y1 in gt_boxes:
            r = [round(x0), round(y0), max(round(x0), round(x1)), max(round(y0), round(y1))]
            draw.rectangle(r, outline=(0, 0, 0), width=3)
            draw.rectangle(r, outline=(255, 255, 255), width=1)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    placed = {}
    for i in order:
        x0, y0, x1, y1 = (round(float(v)) for v in boxes[i])
        x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
        x1, y1 = min(max(x1, x0), width - 1), min(max(y1, y0), height - 1)
        draw.rectangle([x0, y0, x1, y1], outline=class_colour(int(labels[i])), width=line)
        placed[i] = (x0, y0, x1, y1)
    regions = [None] * len(scores)
    for i in order:
        x0, y0, x1, y1 = placed[i]
        text = f"{names[i]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge; always inside the image.
        ly = y0 - h if y0 - h >= 0 else y0
        ly = max(0, min(ly, height - h))
        lx = max(0, min(x0, width - w))
        colour = class_colour(int(labels[i]))
        draw.rectangle([lx, ly, lx + w - 1, ly + h - 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((lx + pad - left, ly + pad - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 150 else (255, 255, 255))
        regions[i] = (min(x0, lx), min(y0, ly), max(x1, lx + w - 1), max(y1, ly + h - 1))
    return out, regions


# ------------------------------------------------------------------ running
def _unique_output(directory: Path, stem: str, taken: set[Path]) -> Path:
    candidate, n = directory / f"{stem}.png", 1
    while candidate.resolve() in taken:
        n += 1
        candidate = directory / f"{stem}_{n}.png"
    taken.add(candidate.resolve())
    return candidate


def _result_rows(dets, *, image_id, file_name, category_ids):
    rows = []
    for box, score, label, name in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), dets.names):
        x0, y0, x1, y1 = box
        row = {"image_id": image_id, "file_name": file_name,
               "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
               "score": round(score, 6), "category_name": name}
        if category_ids is not None:
            row["category_id"] = category_ids[label]
        rows.append(row)
    return rows


def _dataset_items(args):
    from datasets.coco import CocoDetection

    root = Path(args.coco_path)
    if not root.is_dir():
        raise DemoError(f"--coco_path {root}: no such directory (expected val2017/ and annotations/ in it)")
    if args.dataset_json:
        ann = Path(args.dataset_json)
    else:
        candidates = [root / "annotations" / name for name in OVD_VAL_JSONS]
        ann = next((c for c in candidates if c.is_file()), candidates[0])
    if not ann.is_file():
        raise DemoError(f"--dataset: annotation file {ann} not found (pass --dataset_json)")
    dataset = CocoDetection(img_folder=root / "val2017", ann_file=ann, transforms=None)
    count = min(args.num_images, len(dataset))
    return dataset, count


def run(args) -> int:
    if args.confidence_threshold < 0 or args.confidence_threshold > 1:
        raise DemoError(f"--confidence-threshold {args.confidence_threshold}: expected a value in [0, 1]")
    if args.max_detections < 1 or args.batch_size < 1:
        raise DemoError("--max-detections and --batch-size must be positive")
    if args.dataset and (args.input or args.custom_vocabulary or args.vocabulary):
        raise DemoError("--dataset draws a split with its own categories: leave out --input and --vocabulary / "
                        "--custom_vocabulary")
    checkpoint, toy = resolve_checkpoint(args.resume, toy_allowed=not (args.input or args.dataset))
    if toy:
        print(f"no CORA checkpoint given: the bundled miniature model {checkpoint.relative_to(ROOT)} on toy scenes "
              f"(pass --resume for a published checkpoint and --input for your images)", flush=True)
    if args.dataset:
        if args.num_images < 1:
            raise DemoError(f"--num_images {args.num_images}: expected a positive number")
        dataset, count = _dataset_items(args)
        vocabulary, category_ids, novel = list(dataset.category_list), list(dataset.label2catid.values()), None
        inputs = [dataset.img_folder / dataset.coco.imgs[dataset.ids[i]]["file_name"] for i in range(count)]
    else:
        inputs = collect_inputs(args.input or [str(TOY_SAMPLES_DIR if toy else SAMPLES_DIR)])
        if toy and not (args.vocabulary or args.custom_vocabulary):
            from tools.toy.world import CLASSES

            vocabulary, category_ids, novel = [c.name for c in CLASSES], [c.id for c in CLASSES], None
        else:
            vocabulary, category_ids, novel = choose_vocabulary(args)

    import numpy as np

    from models.predictor import Predictor, load_rgb, normalize_vocabulary

    # Category ids and novel indices follow the list's order: the predictor must not merge or rename names.
    changed = [n for n in vocabulary if n not in normalize_vocabulary(vocabulary)]
    if changed or len(normalize_vocabulary(vocabulary)) != len(vocabulary):
        raise DemoError(f"the category names {changed or vocabulary} have extra whitespace or duplicates "
                        f"(ignoring case); the detector cannot keep them apart")

    device = "cpu" if args.cpu else (args.device or None)
    started = time.time()
    clip_archive = args.model_path or (TOY_CLIP if toy else None)
    region_prompt = args.region_prompt_path or (TOY_PROMPT if toy else None)
    predictor = Predictor.from_checkpoint(
        checkpoint, clip_archive=clip_archive, region_prompt=region_prompt,
        device=device, cache_dir=args.text_cache_dir or None, disk_cache=not args.no_text_cache)
    print(f"model {checkpoint} on {predictor.device} ({time.time() - started:.1f} s); vocabulary: "
          f"{len(vocabulary)} classes ({', '.join(vocabulary[:6])}{', ...' if len(vocabulary) > 6 else ''}); "
          f"{len(inputs)} image(s)", flush=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    taken = {p.resolve() for p in inputs}
    rows, failures = [], []
    for start in range(0, len(inputs), args.batch_size):
        batch, images = [], []
        for index in range(start, min(start + args.batch_size, len(inputs))):
            path = inputs[index]
            try:
                if args.dataset:
                    image = dataset.load_image(dataset.ids[index])  # stored pixels: the frame of the annotations
                else:
                    image = load_rgb(path)
            except (OSError, ValueError) as e:
                failures.append(str(path))
                print(f"[{index + 1}/{len(inputs)}] {path}: skipped: {e}", file=sys.stderr, flush=True)
                continue
            batch.append(index)
            images.append(image)
        if not batch:
            continue
        t0 = time.time()
        kwargs = dict(score_threshold=args.confidence_threshold, max_detections=args.max_detections,
                      novel_indices=novel)
        try:
            detections = predictor.predict([np.asarray(im) for im in images], vocabulary,
                                           batch_size=len(images), **kwargs)
        except ValueError:
            # An image the model cannot take (e.g. too thin): find it, skip it, keep the others.
            detections = []
            for index, image in list(zip(batch, images)):
                try:
                    detections.extend(predictor.predict(np.asarray(image), vocabulary, **kwargs))
                except ValueError as e:
                    failures.append(str(inputs[index]))
                    print(f"[{index + 1}/{len(inputs)}] {inputs[index]}: skipped: {e}", file=sys.stderr, flush=True)
                    images.pop(batch.index(index))
                    batch.remove(index)
        seconds = (time.time() - t0) / max(1, len(images))
        for index, image, dets in zip(batch, images, detections):
            path = inputs[index]
            gt = None
            image_id = index
            if args.dataset:
                image_id = dataset.ids[index]
                if args.show_gt:
                    anns = [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
                    gt = [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)]
            drawn, _ = annotate(image, dets.boxes, dets.labels.tolist(), dets.names, dets.scores.tolist(),
                                gt_boxes=gt)
            target = _unique_output(output, path.stem, taken)
            drawn.save(target)
            rows.extend(_result_rows(dets, image_id=image_id, file_name=str(path), category_ids=category_ids))
            print(f"[{index + 1}/{len(inputs)}] {path}: {len(dets)} detection(s) >= {args.confidence_threshold} "
                  f"({seconds:.1f} s) -> {target}", flush=True)
    with open(output / "detections.json", "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # one detection per line
    done = len(inputs) - len(failures)
    print(f"{done} image(s), {len(rows)} detection(s) -> {output / 'detections.json'} "
          f"({time.time() - started:.1f} s)", flush=True)
    if failures:
        print(f"demo.py: {len(failures)} of {len(inputs)} input(s) skipped: {', '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return run(args)
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        # Checkpoint or archive that does not fit, device not available: the message names the file.
        print(f"demo.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
