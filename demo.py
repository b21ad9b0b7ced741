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
`--input`, the demo runs the model trained by tools/toy/run_all.sh and tools/toy/cora_plus_lvis.sh on the
miniature world (`assets/toy/cora_toy.pth`, CORA+) on toy scenes
(`assets/toy/samples/`) with its 16 class names, four of which no annotated box ever showed it (only its own
pseudo boxes); a published CORA checkpoint is needed for real photos.

`--dataset` draws the first `--num_images` images of a COCO-format val split (`--coco_path`:
`val2017/` and `annotations/`) with their detections for the split's own categories, as the
original's demo.py does, and (`--show_gt`) their ground-truth boxes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from demo_inputs import (  # noqa: F401  (demo.DemoError, demo.TOY_CHECKPOINT, ... are the CLI's names)
    CHECKPOINT_ENV,
    DEFAULT_CHECKPOINT,
    OVD_VAL_JSONS,
    ROOT,
    SAMPLES_DIR,
    TOY_CHECKPOINT,
    TOY_CLIP,
    TOY_PROMPT,
    TOY_SAMPLES_DIR,
    DemoError,
    choose_vocabulary,
    collect_inputs,
    detection_rows,
    resolve_checkpoint,
    toy_vocabulary,
)
from util.visualize import PALETTE_SIZE, annotate, class_colour  # noqa: F401


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
    p.add_argument("--custom_vocabulary", "--custom-vocabulary", default=None,
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
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the network in bfloat16 (CPUs with AVX512-BF16 / AMX, GPUs); detections differ "
                        "slightly, speed depends on the hardware (README, Speed; default %(default)s: the "
                        "evaluation's numbers)")
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
    p.add_argument("--serve", action="store_true",
                   help="serve a web page for trying any vocabulary on any image (demo_web.py; needs gradio)")
    p.add_argument("--port", type=int, default=7860, help="--serve: port (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="--serve: address to listen on (default %(default)s, this machine only; 0.0.0.0: all)")
    return p


# ------------------------------------------------------------------ running
def _unique_output(directory: Path, stem: str, taken: set[Path]) -> Path:
    candidate, n = directory / f"{stem}.png", 1
    while candidate.resolve() in taken:
        n += 1
        candidate = directory / f"{stem}_{n}.png"
    taken.add(candidate.resolve())
    return candidate


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


@dataclass
class Job:
    """What one demo run detects: its checkpoint, inputs and vocabulary (category ids / boosted classes when known)."""

    checkpoint: Path
    toy: bool
    inputs: list[Path]
    vocabulary: list[str]
    category_ids: list[int] | None
    novel: list[int] | None
    dataset: object | None = None  # --dataset: the CocoDetection the inputs come from


def plan(args) -> Job:
    """Check the flags and resolve the checkpoint, the inputs and the vocabulary (nothing is loaded yet)."""
    if args.confidence_threshold < 0 or args.confidence_threshold > 1:
        raise DemoError(f"--confidence-threshold {args.confidence_threshold}: expected a value in [0, 1]")
    if args.max_detections < 1 or args.batch_size < 1:
        raise DemoError("--max-detections and --batch-size must be positive")
    if args.dataset and (args.input or args.custom_vocabulary is not None or args.vocabulary):
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
        inputs = [dataset.image_path(dataset.ids[i]) for i in range(count)]
        return Job(checkpoint, toy, inputs, list(dataset.category_list), list(dataset.label2catid.values()), None,
                   dataset)
    inputs = collect_inputs(args.input or [str(TOY_SAMPLES_DIR if toy else SAMPLES_DIR)])
    if toy and not (args.vocabulary or args.custom_vocabulary is not None):
        vocabulary, category_ids, novel = toy_vocabulary()
    else:
        vocabulary, category_ids, novel = choose_vocabulary(args)
    from models.predictor import normalize_vocabulary

    # Category ids and novel indices follow the list's order: the predictor must not merge or rename names.
    changed = [n for n in vocabulary if n not in normalize_vocabulary(vocabulary)]
    if changed or len(normalize_vocabulary(vocabulary)) != len(vocabulary):
        raise DemoError(f"the category names {changed or vocabulary} have extra whitespace or duplicates "
                        f"(ignoring case); the detector cannot keep them apart")
    return Job(checkpoint, toy, inputs, vocabulary, category_ids, novel)


def load_predictor(args, job: Job):
    from models.predictor import Predictor

    started = time.time()
    predictor = Predictor.from_checkpoint(
        job.checkpoint, clip_archive=args.model_path or (TOY_CLIP if job.toy else None),
        region_prompt=args.region_prompt_path or (TOY_PROMPT if job.toy else None),
        device="cpu" if args.cpu else (args.device or None), cache_dir=args.text_cache_dir or None,
        disk_cache=not args.no_text_cache, precision=args.precision)
    names = job.vocabulary
    print(f"model {job.checkpoint} on {predictor.device} ({time.time() - started:.1f} s); vocabulary: "
          f"{len(names)} classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); "
          f"{len(job.inputs)} image(s)", flush=True)
    return predictor


def _skip(job: Job, index: int, error: Exception, failures: list[str]) -> None:
    failures.append(str(job.inputs[index]))
    print(f"[{index + 1}/{len(job.inputs)}] {job.inputs[index]}: skipped: {error}", file=sys.stderr, flush=True)


def read_images(job: Job, indices: range, failures: list[str]) -> tuple[list[int], list]:
    """The readable images of `indices` (RGB PIL, EXIF applied); unreadable ones are reported and skipped."""
    from models.predictor import load_rgb

    batch, images = [], []
    for index in indices:
        try:
            if job.dataset is not None:  # the stored pixels: the frame of the annotations
                image = job.dataset.load_image(job.dataset.ids[index])
            else:
                image = load_rgb(job.inputs[index])
        except (OSError, ValueError) as e:
            _skip(job, index, e, failures)
            continue
        batch.append(index)
        images.append(image)
    return batch, images


def detect_images(predictor, job: Job, args, batch: list[int], images: list, failures: list[str]):
    """Detections for a batch; an image the model cannot take (e.g. too thin) is found, skipped and reported,
    the others kept. Returns the `(index, image, detections)` of every image detected."""
    import numpy as np

    kwargs = dict(score_threshold=args.confidence_threshold, max_detections=args.max_detections,
                  novel_indices=job.novel)
    try:
        detections = predictor.predict([np.asarray(im) for im in images], job.vocabulary, batch_size=len(images),
                                       **kwargs)
        return list(zip(batch, images, detections))
    except ValueError:
        done = []
        for index, image in zip(batch, images):
            try:
                done.append((index, image, predictor.predict(np.asarray(image), job.vocabulary, **kwargs)[0]))
            except ValueError as e:
                _skip(job, index, e, failures)
        return done


def ground_truth_boxes(job: Job, image_id: int) -> list[tuple[float, float, float, float]]:
    anns = [a for a in job.dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
    return [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)]


def run(args) -> int:
    if args.serve:
        import demo_web

        return demo_web.serve(args)
    job = plan(args)
    started = time.time()
    predictor = load_predictor(args, job)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    taken = {p.resolve() for p in job.inputs}
    rows, failures = [], []
    for start in range(0, len(job.inputs), args.batch_size):
        batch, images = read_images(job, range(start, min(start + args.batch_size, len(job.inputs))), failures)
        if not batch:
            continue
        t0 = time.time()
        detected = detect_images(predictor, job, args, batch, images, failures)
        seconds = (time.time() - t0) / max(1, len(detected))
        for index, image, dets in detected:
            path = job.inputs[index]
            image_id = job.dataset.ids[index] if job.dataset is not None else index
            gt = ground_truth_boxes(job, image_id) if job.dataset is not None and args.show_gt else None
            drawn, _ = annotate(image, dets.boxes, dets.labels.tolist(), dets.names, dets.scores.tolist(),
                                gt_boxes=gt)
            target = _unique_output(output, path.stem, taken)
            drawn.save(target)
            rows.extend(detection_rows(dets, image_id=image_id, file_name=str(path), category_ids=job.category_ids))
            print(f"[{index + 1}/{len(job.inputs)}] {path}: {len(dets)} detection(s) >= {args.confidence_threshold} "
                  f"({seconds:.1f} s) -> {target}", flush=True)
    with open(output / "detections.json", "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # one detection per line
    print(f"{len(job.inputs) - len(failures)} image(s), {len(rows)} detection(s) -> {output / 'detections.json'} "
          f"({time.time() - started:.1f} s)", flush=True)
    if failures:
        print(f"demo.py: {len(failures)} of {len(job.inputs)} input(s) skipped: {', '.join(failures)}",
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
