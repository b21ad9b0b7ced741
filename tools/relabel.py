"""CLIP-aligned labelling (SPEC §8.1): relabel the base training boxes with the region-prompted CLIP.

    torchrun --nproc_per_node=8 tools/relabel.py --coco_path data/coco --backbone clip_RN50 \\
        --region_prompt_path logs/region_prompt_R50.pth
    # -> data/coco/annotations/instances_train2017_base_RN50relabel.json (what --label_version RN50base reads)
    python tools/relabel.py --merge_only --ori_annotation A.json --relabel_folder DIR --num_files 8 --target_name B.json

Provenance. The original repository never published the code that produced its relabelled training
files (`instances_train2017_base_RN50relabel.json`, `..._RN50x4relabel_pre.json`): its README says
the labelling code "will be released soon", and its master branch holds only `relabel.py`, the merge
step reproduced here by `merge_relabelled` (same flags, same printed lines, same output). The
labelling itself is the method the authors described: every ground-truth box of the base training
json is classified by the region classifier with the learned region prompt, over the training
vocabulary, and takes the class of largest probability. Where details had to be chosen they follow
the original's `region` branch (commit 38124c2), whose evaluation loop has an undocumented
`--export` path doing exactly this, and which the merge step's file names match:

* boxes as annotated (crowd and empty boxes skipped, as the dataset drops them), images with the
  val transform (short side 800, long side at most 1333) and no augmentation, batches of
  `--batch_size` images padded as the localizer pads them;
* region classifier: RoIAlign 2S x 2S on layer3 -> CLIP layer4 -> attention pool with the region
  prompt -> L2-normalise; text: the training json's category names, 80 templates, `--text_len` 25
  (the region-prompting config); class = argmax of `100 * cos` (= argmax of the softmax);
* each process writes `export_label_{rank}.json`: `{annotation id (string): new category id}`.

This command runs both steps: the distributed export, then (on rank 0) the merge with
`--num_files` = the number of processes. `--merge_only` runs the merge alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import torch  # noqa: E402

from datasets.coco import OVD_TRAIN_JSON, CocoDetection, make_coco_target  # noqa: E402
from datasets.lvis import LVIS_TRAIN_JSONS, LvisDetection  # noqa: E402
from datasets.transforms import make_coco_transforms  # noqa: E402
from models.clip import (  # noqa: E402
    build_text_classifier,
    load_region_prompt,
    read_clip_archive,
    resolve_archive_path,
)
from tools.region_prompt import (  # noqa: E402
    TRAIN_JSON,
    RegionClassifier,
    build_region_classifier,
    default_prompt_path,
    eval_loader,
    images_with_boxes,
    open_boxes,
    region_logits,
    split_files,
    text_embeddings,
)
from util import dist  # noqa: E402
from util.atomic import write_json  # noqa: E402
from util.logging import MetricLogger  # noqa: E402
from util.run import run_cli  # noqa: E402

# The relabelled json each localizer config reads (its --label_version, SPEC §2.1; LVIS: datasets/lvis.py).
RELABELLED_JSON = {
    "coco": {"clip_RN50": OVD_TRAIN_JSON["RN50base"], "clip_RN50x4": OVD_TRAIN_JSON["RN50x4base_prev"]},
    "lvis": {"clip_RN50": LVIS_TRAIN_JSONS["RN50base"], "clip_RN50x4": LVIS_TRAIN_JSONS["RN50x4base"]},
}


def export_file(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"export_label_{index}.json"


class AnnotatedBoxes:
    """A detection dataset (CocoDetection / LvisDetection) whose targets also hold `ann_ids` `[N]`: the
    annotation id of every kept box.

    The ids are filtered with the same rule as the boxes (`make_coco_target`: crowd dropped, boxes
    with x2 <= x1 or y2 <= y1 after clamping dropped), so `ann_ids[i]` is the annotation of `boxes[i]`.
    """

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]  # every image, even one without boxes (LVIS's loader would skip it)
        image = self.load_image(image_id)
        width, height = image.size
        annotations = [a for a in self.coco.imgToAnns.get(image_id, []) if a.get("iscrowd", 0) == 0]
        target = make_coco_target(annotations, image_id=image_id, width=width, height=height,
                                  catid2label=self.catid2label)
        # one annotation at a time through the same rule: which ones survive, in order
        kept = [a["id"] for a in annotations
                if len(make_coco_target([a], image_id=image_id, width=width, height=height,
                                        catid2label=self.catid2label)["boxes"])]
        target["ann_ids"] = torch.tensor(kept, dtype=torch.int64)
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        if len(target["ann_ids"]) != len(target["boxes"]):
            raise RuntimeError(f"image id {image_id}: {len(target['boxes'])} boxes but {len(target['ann_ids'])} "
                               f"annotation ids after the transforms (a transform that drops boxes?)")
        return image, target


class AnnotatedCocoBoxes(AnnotatedBoxes, CocoDetection):
    pass


class AnnotatedLvisBoxes(AnnotatedBoxes, LvisDetection):
    pass


@torch.no_grad()
def predict_labels(model: RegionClassifier, loader, text_features: torch.Tensor,
                   device: torch.device) -> dict[int, int]:
    """`{annotation id: label index}` = argmax over `text_features [C,D]` of each box's region logits."""
    model.eval()
    out: dict[int, int] = {}
    logger = MetricLogger()
    for samples, targets in logger.log_every(loader, 10 if dist.get_world_size() == 1 else 100, "Relabel:"):
        samples = samples.to(device)
        boxes = [t["boxes"].to(device) for t in targets]
        ids = torch.cat([t["ann_ids"] for t in targets]).tolist()
        if not ids:
            continue
        labels = region_logits(model(samples, boxes), text_features).argmax(dim=-1).tolist()
        out.update(zip(ids, labels))
    return out


def export_labels(model: RegionClassifier, dataset: CocoDetection | LvisDetection, text_features: torch.Tensor, *,
                  folder: str | os.PathLike, batch_size: int, num_workers: int,
                  device: torch.device) -> dict[str, int]:
    """Label this process's share of the images (`rank::world_size`) and write `export_label_{rank}.json`
    (`{str(annotation id): category id}`); returns that mapping."""
    loader = eval_loader(dataset, images_with_boxes(dataset), batch_size=batch_size, num_workers=num_workers)
    labels = predict_labels(model, loader, text_features, device)
    mapping = {str(ann_id): dataset.label2catid[label] for ann_id, label in labels.items()}
    write_json(mapping, export_file(folder, dist.get_rank()))
    return mapping


def merge_relabelled(*, ori_annotation: str | os.PathLike, relabel_folder: str | os.PathLike, num_files: int,
                     target_name: str | os.PathLike) -> dict[str, Any]:
    """The original `relabel.py`: apply `export_label_{i}.json` (i < num_files) to `ori_annotation`.

    Later files win for an id listed twice (`dict.update`). Every annotation whose id is in the merged
    mapping gets the mapped `category_id`; all else is written unchanged to `target_name`. Prints
    `label accuracy: <unchanged / len(mapping)>` and `<len(mapping)> relabeled instances in total`.
    Returns `{'accuracy', 'total', 'unchanged'}`.
    """
    with open(ori_annotation) as f:
        anno = json.load(f)
    merged: dict[str, Any] = {}
    for i in range(num_files):
        path = export_file(relabel_folder, i)
        if not path.is_file():
            raise FileNotFoundError(f"--relabel_folder {relabel_folder}: {path.name} not found (--num_files "
                                    f"{num_files} expects export_label_0.json .. export_label_{num_files - 1}.json)")
        with open(path) as f:
            merged.update(json.load(f))
    mapping = {int(k): v for k, v in merged.items()}
    if not mapping:
        raise ValueError(f"--relabel_folder {relabel_folder}: the {num_files} export file(s) hold no annotation; "
                         f"nothing to relabel")
    unchanged = 0
    for inst in anno["annotations"]:
        if inst["id"] in mapping:
            if inst["category_id"] == mapping[inst["id"]]:
                unchanged += 1
            inst["category_id"] = mapping[inst["id"]]
    total = len(mapping)
    print(f"label accuracy: {unchanged / total}")
    print(f"{total} relabeled instances in total")
    write_json(anno, target_name)
    return {"accuracy": unchanged / total, "total": total, "unchanged": unchanged}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CORA CLIP-aligned labelling", add_help=True)
    p.add_argument("--dataset_file", default="coco", choices=["coco", "lvis"])
    p.add_argument("--coco_path", default="data/coco", type=str)
    p.add_argument("--lvis_path", default="", type=str, help="LVIS: folder with the jsons and train2017/ val2017/")
    p.add_argument("--train_json", default="", type=str,
                   help=f"json whose boxes are relabelled (default {TRAIN_JSON} in <coco_path>/annotations; "
                        f"LVIS {LVIS_TRAIN_JSONS['']} in <lvis_path>)")
    p.add_argument("--backbone", default="clip_RN50", type=str, help="clip_RN50 or clip_RN50x4")
    p.add_argument("--model_path", default="", type=str, help="OpenAI CLIP archive (default ~/.cache/clip/<name>.pt)")
    p.add_argument("--region_prompt_path", default="", type=str,
                   help="learned region prompt (default logs/region_prompt_<R50|R50x4>.pth)")
    p.add_argument("--text_len", default=25, type=int, help="context length of the text classifier")
    p.add_argument("--image_scale", default=1.0, type=float, help="multiplies the val transform's image size")
    p.add_argument("--batch_size", default=4, type=int, help="images per process")
    p.add_argument("--num_workers", default=2, type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist_url", default="env://")
    # the original relabel.py's flags (merge step)
    p.add_argument("--ori_annotation", default="", type=str, help="json to relabel (default: --train_json)")
    p.add_argument("--relabel_folder", default="", type=str,
                   help="where export_label_{rank}.json are written / read (default logs/relabel_<RN50|RN50x4>)")
    p.add_argument("--num_files", default=0, type=int,
                   help="export files to merge (default: the number of processes of this run)")
    p.add_argument("--target_name", default="", type=str,
                   help="relabelled json (default: the file the backbone's localizer config reads, next to the "
                        "training json)")
    p.add_argument("--merge_only", action="store_true", help="only merge existing export_label_*.json files")
    return p


def _resolve_defaults(args) -> None:
    name = args.backbone[len("clip_"):] if args.backbone.startswith("clip_") else args.backbone
    args.relabel_folder = args.relabel_folder or f"logs/relabel_{name}{'_lvis' if args.dataset_file == 'lvis' else ''}"
    if args.target_name and args.ori_annotation:
        return  # the merge alone, of given files
    train_json, _, _ = split_files(args, "train")
    if not args.target_name:
        if args.backbone not in RELABELLED_JSON[args.dataset_file]:
            raise ValueError(f"--backbone {args.backbone}: no default --target_name; pass one")
        args.target_name = str(train_json.parent / RELABELLED_JSON[args.dataset_file][args.backbone])
    args.ori_annotation = args.ori_annotation or str(train_json)


def main(args) -> dict[str, Any]:
    """Export (all processes) then merge (rank 0). Returns `{'mapping': this process's export or None,
    'merge': the merge's counts (rank 0) or None}`."""
    _resolve_defaults(args)
    if args.merge_only:
        if args.num_files < 1:
            raise ValueError("--merge_only needs --num_files (how many export_label_{i}.json to read)")
        return {"mapping": None, "merge": merge_relabelled(
            ori_annotation=args.ori_annotation, relabel_folder=args.relabel_folder, num_files=args.num_files,
            target_name=args.target_name)}

    dist.init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    prompt_path = args.region_prompt_path or default_prompt_path(args.backbone)
    arch, clip_sd = read_clip_archive(resolve_archive_path(args.backbone, args.model_path))
    model = build_region_classifier(arch, clip_sd, region_prompt=load_region_prompt(prompt_path, arch)).to(device)
    classifier = build_text_classifier(arch, args.text_len, clip_sd).to(device)
    del clip_sd

    dataset = open_boxes(args, "train",
                         make_coco_transforms("val", clip_normalisation=True, image_scale=args.image_scale),
                         AnnotatedLvisBoxes if args.dataset_file == "lvis" else AnnotatedCocoBoxes)
    text = text_embeddings(classifier, dataset.category_list)
    if dist.is_main_process():
        Path(args.relabel_folder).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    mapping = export_labels(model, dataset, text, folder=args.relabel_folder, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=device)
    written = export_file(args.relabel_folder, dist.get_rank())
    # force=True: every rank reports its own file (non-master prints are silenced otherwise)
    print(f"rank {dist.get_rank()}: {len(mapping)} boxes labelled -> {written}", flush=True,
          **({"force": True} if dist.get_world_size() > 1 else {}))
    dist.barrier()
    merge = None
    if dist.is_main_process():
        merge = merge_relabelled(ori_annotation=args.ori_annotation, relabel_folder=args.relabel_folder,
                                 num_files=args.num_files or dist.get_world_size(), target_name=args.target_name)
        print(f"relabelled json written to {args.target_name}", flush=True)
    dist.barrier()
    return {"mapping": mapping, "merge": merge}


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args(), "tools/relabel.py"))
