"""CORA+ pseudo-labelling: a trained CORA detector turns image-level class tags into pseudo boxes.

    # COCO (the original's export_pseudo_label.py): each training image detected with its own tags
    torchrun --nproc_per_node=8 tools/pseudo_label.py --resume logs/COCO/<config>/RN50x4/checkpoint_best.pth \\
        --coco_path $data_path --cls_annotation_path $data_path/annotations/coco_train_tags.json
    # -> $data_path/annotations/pseudo_label_thr0.2.json, what the localizer's --pseudo_box reads
    # LVIS (the original's export_pseudo_label_LVIS.py): the norare training images detected with all
    # classes of --vocabulary_json, only the rare classes' detections kept
    torchrun --nproc_per_node=8 tools/pseudo_label.py --resume ckpt.pth --dataset_file lvis --lvis_path $lvis_path \\
        --vocabulary_json $lvis_path/lvis_v1_val.json --keep_frequency r

Every image of the training json (`--train_json`, default the dataset's base / norare training file)
is read as the training loader reads it (stored pixels, RGB), resized and normalised as at
evaluation (the checkpoint's `--image_scale`), detected alone (a batch of one, as the original)
through `models.inference.detect` with the checkpoint's EMA weights, and its detections scoring at
least `--det_thr` (0.2) are kept. Vocabulary: with `--cls_annotation_path` (`{image_id: [class
names]}`, e.g. from `tools/caption_tags.py`) the image's own tags, without the novel boost (the
original requires `--target_class_factor 1` for such lists); with `--vocabulary_json` the json's
categories, the novel boost of the checkpoint's `--target_class_factor` on its rare classes, and only
detections of `--keep_frequency` classes kept.

Output: the original's format, a JSON list of `{"image_id", "bbox": [x, y, w, h] in pixels of the
stored image, "class_label": name, "score"}`. Each process labels `rank::world_size` of the images
and writes its part (`<output stem>_rand<rank>.json`, rewritten atomically every `--save_every`
images, so an interrupted run resumes where it stopped); rank 0 merges the parts in rank order.
Images without tags (or with an empty list) are skipped and counted; tags the text encoder would
cut to `text_len` tokens, or that name no class at all, stop the run before any detection.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import torch  # noqa: E402

from datasets.coco import CocoDetection, load_annotation_json  # noqa: E402
from datasets.lvis import LVIS_TRAIN_JSON, LvisDetection  # noqa: E402
from models.predictor import Predictor, normalize_vocabulary  # noqa: E402
from util import dist  # noqa: E402
from util.atomic import write_json  # noqa: E402
from util.run import run_cli  # noqa: E402

COCO_TRAIN_JSON = "instances_train2017_base.json"
MAX_DETECTIONS = 100  # PostProcess's top-k before the score threshold (the original's COCO setting)


def output_path(args) -> Path:
    if args.output:
        return Path(args.output)
    root = Path(args.coco_path) / "annotations" if args.dataset_file == "coco" else Path(args.lvis_path)
    return root / f"pseudo_label_thr{args.det_thr:g}.json"


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.stem}_rand{rank}.json")


def open_dataset(args) -> CocoDetection | LvisDetection:
    """The training images, without transforms (the Predictor resizes and normalises)."""
    if args.dataset_file == "coco":
        root = Path(args.coco_path)
        ann = Path(args.train_json) if args.train_json else root / "annotations" / COCO_TRAIN_JSON
        return CocoDetection(img_folder=Path(args.image_folder) if args.image_folder else root / "train2017",
                             ann_file=ann)
    root = Path(args.lvis_path)
    ann = Path(args.train_json) if args.train_json else root / LVIS_TRAIN_JSON
    return LvisDetection(img_folder=Path(args.image_folder) if args.image_folder else root, ann_file=ann)


def read_tags(path: str, image_ids: Sequence[int]) -> tuple[dict[int, list[str]], dict[str, int]]:
    """`{image_id: [names]}` for the dataset's images, and the counts of what was skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--cls_annotation_path {path}: file not found (tools/caption_tags.py makes one)")
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--cls_annotation_path {path}: not valid JSON ({e})") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"--cls_annotation_path {path}: expected a json object {{image_id: [class names]}}, "
                         f"found {type(raw).__name__}")
    by_id = {str(i): i for i in image_ids}
    tags, counts = {}, {"images without tags": 0, "empty tag lists": 0, "tagged ids not in the json": 0}
    for key, names in raw.items():
        if str(key) not in by_id:
            counts["tagged ids not in the json"] += 1
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"--cls_annotation_path {path}: image {key}: expected a list of class names, "
                             f"found {names!r}"[:300])
        cleaned = [n for n in names if n.strip()]
        if not cleaned:
            counts["empty tag lists"] += 1
            continue
        tags[by_id[str(key)]] = list(normalize_vocabulary(cleaned))
    counts["images without tags"] = len(image_ids) - len(tags) - counts["empty tag lists"]
    if not tags:
        raise ValueError(f"--cls_annotation_path {path}: none of its {len(raw)} image ids is an image of the "
                         f"training json (e.g. {list(raw)[:5]} vs {list(by_id)[:5]})")
    return tags, counts


def check_tag_names(predictor: Predictor, tags: Mapping[int, list[str]], source: str) -> None:
    """Every tag must be a name the text encoder reads whole: a cut name would get another class's embedding."""
    names = sorted({n for names in tags.values() for n in names})
    cut = predictor.truncated_names(names)
    if cut:
        text_len = predictor.model.classifier.text_len
        raise ValueError(f"{source}: {len(cut)} tag name(s) are longer than the checkpoint's text encoder reads "
                         f"(--text_len {text_len} tokens per prompt) and would be cut: {cut[:10]}; shorten or "
                         f"drop them")


def lvis_vocabulary(path: str, keep_frequency: str) -> tuple[list[str], list[int], list[int]]:
    """(names, rare indices to boost, indices of the classes whose detections are kept)."""
    data = load_annotation_json(path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    missing = [c["id"] for c in cats if c.get("frequency") not in ("r", "c", "f")]
    if missing:
        raise ValueError(f"--vocabulary_json {path}: categories {missing[:10]} have no 'frequency' (r, c or f); "
                         f"the rare classes are read from it")
    names = [c["name"].replace("_", " ") for c in cats]
    rare = [i for i, c in enumerate(cats) if c["frequency"] == "r"]
    keep = [i for i, c in enumerate(cats) if c["frequency"] in keep_frequency]
    return names, rare, keep


def run_settings(args) -> dict[str, Any]:
    """What a part file's boxes depend on: a part of another run is never merged into this one."""
    return {"resume": str(Path(args.resume).resolve()), "det_thr": args.det_thr,
            "cls_annotation_path": args.cls_annotation_path, "vocabulary_json": args.vocabulary_json,
            "keep_frequency": args.keep_frequency, "train_json": args.train_json,
            "world_size": dist.get_world_size()}


def load_part(path: Path, settings: Mapping[str, Any]) -> tuple[set[int], list[dict[str, Any]]]:
    """A rank's part file of an earlier, interrupted run: the images it finished and their boxes."""
    if not path.is_file():
        return set(), []
    part = json.loads(path.read_text())
    if part.get("settings") != dict(settings):
        raise ValueError(f"{path} was written by a run with other settings ({part.get('settings')}, this run "
                         f"{dict(settings)}); delete it, or pass another --output")
    return set(part["done"]), part["boxes"]


def label_images(predictor: Predictor, dataset, ids: Sequence[int], vocabulary_of, *, det_thr: float,
                 keep: set[int] | None, part: Path, save_every: int, settings: Mapping[str, Any]
                 ) -> list[dict[str, Any]]:
    """Detect `ids` one image at a time; boxes of the kept classes scoring >= det_thr. Progress is saved to
    `part` every `save_every` images, and images an earlier run finished are not labelled again."""
    done, boxes = load_part(part, settings)
    todo = [i for i in ids if i not in done]
    if done:
        print(f"{part}: {len(done)} image(s) already labelled, {len(todo)} to go", flush=True)
    started = time.time()
    for n, image_id in enumerate(todo, 1):
        names, novel = vocabulary_of(image_id)
        tensor, size = predictor.preprocess(dataset.load_image(image_id))
        [dets] = predictor.detect([tensor], [size], names, score_threshold=det_thr, max_detections=MAX_DETECTIONS,
                                  novel_indices=novel, clip_boxes=False)
        for box, score, label in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist()):
            if keep is not None and label not in keep:
                continue
            x0, y0, x1, y1 = box
            boxes.append({"image_id": image_id, "bbox": [x0, y0, x1 - x0, y1 - y0], "class_label": names[label],
                          "score": score})
        done.add(image_id)
        if n % save_every == 0 or n == len(todo):
            write_json({"settings": dict(settings), "done": sorted(done), "boxes": boxes}, part)
            rate = n / max(time.time() - started, 1e-9)
            print(f"[{len(done)}/{len(ids)}] {len(boxes)} pseudo box(es), {rate:.2f} images/s", flush=True)
    return boxes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CORA+ pseudo-labelling", add_help=True)
    p.add_argument("--resume", default="", help="a trained CORA checkpoint (its EMA weights are used)")
    p.add_argument("--model_path", default="", help="CLIP archive, for a checkpoint without CLIP weights")
    p.add_argument("--region_prompt_path", default="", help="region prompt, for a checkpoint without CLIP weights")
    p.add_argument("--dataset_file", default="coco", choices=["coco", "lvis"])
    p.add_argument("--coco_path", default="data/coco")
    p.add_argument("--lvis_path", default="")
    p.add_argument("--train_json", default="", help="images to label (default: the base / norare training json)")
    p.add_argument("--image_folder", default="", help="their images (default <coco_path>/train2017, <lvis_path>)")
    p.add_argument("--cls_annotation_path", default="", help="image-level tags {image_id: [class names]}")
    p.add_argument("--vocabulary_json", default="", help="LVIS-style json whose categories every image is "
                                                          "detected with (instead of tags)")
    p.add_argument("--keep_frequency", default="r", help="with --vocabulary_json: keep detections of these "
                                                         "frequency groups (r, c, f; default r)")
    p.add_argument("--det_thr", default=0.2, type=float, help="keep detections scoring at least this")
    p.add_argument("--output", default="", help="merged pseudo-box json (default <annotations>/pseudo_label_thr"
                                                "<det_thr>.json)")
    p.add_argument("--save_every", default=200, type=int, help="images between progress saves")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist_url", default="env://")
    return p


def check_args(args) -> None:
    if not args.resume:
        raise ValueError("--resume: the CORA checkpoint that labels the images is required")
    if bool(args.cls_annotation_path) == bool(args.vocabulary_json):
        raise ValueError("give either --cls_annotation_path (per-image tags) or --vocabulary_json (one vocabulary "
                         "for every image, LVIS-style)")
    if not 0.0 <= args.det_thr <= 1.0:
        raise ValueError(f"--det_thr {args.det_thr}: expected a score in [0, 1]")
    if args.save_every < 1:
        raise ValueError(f"--save_every {args.save_every}: expected a positive number")
    if not args.keep_frequency or set(args.keep_frequency) - set("rcf"):
        raise ValueError(f"--keep_frequency {args.keep_frequency!r}: expected letters of 'rcf'")


def main(args) -> list[dict[str, Any]] | None:
    """Label this process's share, then (rank 0) merge every part; returns the merged list on rank 0."""
    check_args(args)
    dist.init_distributed_mode(args)
    output = output_path(args)
    dataset = open_dataset(args)
    predictor = Predictor.from_checkpoint(args.resume, clip_archive=args.model_path or None,
                                          region_prompt=args.region_prompt_path or None, device=args.device)
    if args.cls_annotation_path:
        tags, counts = read_tags(args.cls_annotation_path, dataset.ids)
        check_tag_names(predictor, tags, f"--cls_annotation_path {args.cls_annotation_path}")
        print(f"{len(tags)} tagged image(s) to label; skipped: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
              flush=True)
        ids, keep = sorted(tags), None  # a per-image tag list has no novel classes to boost

        def vocabulary_of(image_id):
            return tags[image_id], None
    else:
        names, rare, kept = lvis_vocabulary(args.vocabulary_json, args.keep_frequency)
        predictor.check_names(names)
        ids, keep = list(dataset.ids), set(kept)

        def vocabulary_of(image_id):
            return names, rare

    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.is_main_process():
        output.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    settings = run_settings(args)
    label_images(predictor, dataset, ids[rank::world], vocabulary_of, det_thr=args.det_thr, keep=keep,
                 part=part_path(output, rank), save_every=args.save_every, settings=settings)
    dist.barrier()
    if not dist.is_main_process():
        return None
    merged = [box for r in range(world) for box in load_part(part_path(output, r), settings)[1]]
    write_json(merged, output)
    classes = len({b["class_label"] for b in merged})
    print(f"{len(merged)} pseudo box(es) of {classes} classes on {len({b['image_id'] for b in merged})} image(s) "
          f"-> {output}", flush=True)
    return merged


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args(), "tools/pseudo_label.py"))
