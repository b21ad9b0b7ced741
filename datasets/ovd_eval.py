"""Detection evaluators: COCO open-vocabulary (SPEC §6.1–6.2) and LVIS (SPEC §6.3).

`CocoOVDEvaluator` computes the 12 standard COCO box statistics plus the OVD numbers the paper
reports: AP50 over the 48 base and over the 17 novel ("target") categories, each the mean of the
per-category AP50 (or over the json's own split when its categories carry `"split"`: `ovd_split`),
and the matching recalls. `stats` holds 16 numbers, the first 12 as fractions
and the last 4 in percent, exactly as the original appends them; `stats[13]` (novel AP50) picks the
best checkpoint.

How this differs from the original's DETR-style evaluator, without changing any number:

* The original ran pycocotools' per-image evaluation in every `update` and gathered the per-image
  match tables across ranks. Here the detections themselves are gathered (as compact arrays) and
  evaluated once. Per-image evaluation depends only on an image's own detections, so the result is
  the same, and it works with both backends (faster-coco-eval keeps its per-image tables in C++).
* Images are de-duplicated by image id keeping the first occurrence in rank order, as the
  original's `np.unique(..., return_index=True)` did; `DistributedSampler` pads the last batch
  with repeated images.
* The evaluated images are the ones passed to `update`, as in the original (not every image of
  the ground truth).

Either pycocotools or faster-coco-eval computes the COCO matching; both give the same `precision`
and `recall` arrays up to float rounding (faster-coco-eval is several times faster). LVIS uses
faster-coco-eval's `lvis_style` mode, which follows the LVIS API (federated negatives, not
exhaustively annotated categories, rare/common/frequent groups).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from datasets.coco_ovd import BASE_CATIDS, NOVEL_CATIDS
from util import dist as dist_utils

OVD_SPLITS: tuple[str, ...] = ("base", "novel")


def ovd_split(categories: Iterable[Mapping[str, Any]]) -> tuple[frozenset[int], frozenset[int]]:
    """`(base category ids, novel category ids)` of a json's `categories`.

    A json whose categories carry `"split": "base" | "novel"` (e.g. the toy world's) defines its own
    split; a category without the field is in neither group. An LVIS json (categories with
    `frequency`) splits into base = common and frequent, novel = rare (the classes its open-vocabulary
    setting removes from training). Otherwise (COCO's OVD jsons, which have neither field) the split
    is COCO's 48 / 17 by category id.
    """
    categories = list(categories)
    if not any("split" in c for c in categories):
        if categories and all("frequency" in c for c in categories):
            return (frozenset(c["id"] for c in categories if c["frequency"] != "r"),
                    frozenset(c["id"] for c in categories if c["frequency"] == "r"))
        return frozenset(BASE_CATIDS), frozenset(NOVEL_CATIDS)
    bad = [(c["id"], c["split"]) for c in categories if "split" in c and c["split"] not in OVD_SPLITS]
    if bad:
        raise ValueError(f"category split must be one of {OVD_SPLITS}; found (id, split) {bad[:5]}")
    return tuple(frozenset(c["id"] for c in categories if c.get("split") == s) for s in OVD_SPLITS)

STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    "AP50_base", "AP50_novel", "AR50_base", "AR50_novel",
)  # fmt: skip

BACKENDS: tuple[str, ...] = ("pycocotools", "faster-coco-eval")

# The 12 summary lines of pycocotools' COCOeval.summarize: (is_ap, iou, area, max_dets).
_SUMMARY_ROWS: tuple[tuple[bool, float | None, str, int], ...] = (
    (True, None, "all", 100),
    (True, 0.5, "all", 100),
    (True, 0.75, "all", 100),
    (True, None, "small", 100),
    (True, None, "medium", 100),
    (True, None, "large", 100),
    (False, None, "all", 1),
    (False, None, "all", 10),
    (False, None, "all", 100),
    (False, None, "small", 100),
    (False, None, "medium", 100),
    (False, None, "large", 100),
)
_COCO_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
_LVIS_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} catIds={:>3s}] = {:0.3f}"

# Per image: (category ids int64 [N], boxes xywh [N,4], scores [N]) — compact for gathering.
ImageDetections = tuple[np.ndarray, np.ndarray, np.ndarray]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """'auto' → faster-coco-eval when importable, else pycocotools; also accepts `faster_coco_eval`."""
    name = backend.replace("_", "-").lower()
    if name == "auto":
        return "faster-coco-eval" if faster_coco_eval_available() else "pycocotools"
    if name not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if name == "faster-coco-eval" and not faster_coco_eval_available():
        raise ImportError(
            "backend 'faster-coco-eval' requested but the faster_coco_eval package is not installed"
        )
    return name


def _dataset_dict(gt: Any) -> dict[str, Any]:
    """The annotation json behind `gt`: a COCO-like object (`.dataset`), a dict, or a json path."""
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            data = json.load(f)
    elif isinstance(gt, Mapping):
        data = gt
    elif isinstance(getattr(gt, "dataset", None), Mapping):
        data = gt.dataset
    else:
        raise TypeError(
            "ground truth must be a COCO object, an annotation dict or a json path; "
            f"found {type(gt).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"ground-truth annotation json has no {key!r} key")
    # Evaluation writes flags into the annotation dicts; keep the caller's copy untouched.
    return copy.deepcopy(dict(data))


def _label_table(label2catid: Sequence[int] | Mapping[int, int], valid_catids: Iterable[int]) -> list[int]:
    """label2catid as a list, checked against the ground truth's categories."""
    if isinstance(label2catid, Mapping):
        keys = sorted(int(k) for k in label2catid)
        if keys != list(range(len(keys))):
            raise ValueError(f"label2catid keys must be 0..{len(keys) - 1}; found {keys}")
        table = [int(label2catid[k]) for k in range(len(keys))]
    else:
        table = [int(c) for c in label2catid]
    valid = set(valid_catids)
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ValueError(f"label2catid maps to category ids {unknown} that the ground truth does not declare")
    return table


def merge_gathered(per_rank: Sequence[Mapping[int, ImageDetections]]) -> dict[int, ImageDetections]:
    """Union of the ranks' per-image detections, sorted by image id; an image seen by several
    ranks (DistributedSampler padding) keeps the first occurrence in rank order."""
    merged: dict[int, ImageDetections] = {}
    for part in per_rank:
        for image_id, dets in part.items():
            merged.setdefault(int(image_id), dets)
    return dict(sorted(merged.items()))


def _coco_results(detections: Mapping[int, ImageDetections]) -> list[dict[str, Any]]:
    """COCO results list (`image_id`, `category_id`, `bbox` xywh, `score`), image by image."""
    results = []
    for image_id, (cat_ids, boxes, scores) in detections.items():
        for cat_id, box, score in zip(cat_ids.tolist(), boxes.tolist(), scores.tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": cat_id, "bbox": box, "score": score})
    return results


class _DetectionStore:
    """Per-rank detections keyed by image id, converted to COCO conventions on arrival."""

    def __init__(
        self, *, image_ids: Iterable[int], label2catid: list[int] | None, valid_catids: Iterable[int]
    ):
        self._image_ids = set(image_ids)
        self._label2catid = label2catid
        self._valid_catids = set(valid_catids)
        self.local: dict[int, ImageDetections] = {}
        self.merged: dict[int, ImageDetections] | None = None

    def add(self, predictions: Mapping[Any, Mapping[str, Any]]) -> None:
        for raw_id, pred in predictions.items():
            image_id = int(raw_id)
            if image_id not in self._image_ids:
                raise ValueError(f"prediction for image id {image_id}, which is not in the ground truth")
            if image_id in self.local:
                continue  # the first result of an image wins, as in the original's de-duplication
            self.local[image_id] = self._convert(image_id, pred)
        self.merged = None

    def _convert(self, image_id: int, pred: Mapping[str, Any]) -> ImageDetections:
        missing = [k for k in ("scores", "labels", "boxes") if k not in pred]
        if missing:
            raise ValueError(
                f"prediction for image {image_id} lacks {missing}; expected scores, labels, boxes"
            )
        scores = torch.as_tensor(pred["scores"]).detach().cpu().reshape(-1)
        labels = torch.as_tensor(pred["labels"]).detach().cpu().reshape(-1).long()
        boxes = torch.as_tensor(pred["boxes"]).detach().cpu()
        n = scores.numel()
        if labels.numel() != n or boxes.shape != (n, 4):
            raise ValueError(
                f"prediction for image {image_id}: expected scores [N], labels [N], boxes [N,4]; found "
                f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)}, boxes {tuple(boxes.shape)}"
            )
        # xyxy -> xywh in the boxes' own dtype (float32 from PostProcess), as the original did.
        x0, y0, x1, y1 = boxes.unbind(-1)
        xywh = torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)
        if self._label2catid is None:
            cat_ids = labels.numpy()
            bad = sorted(set(cat_ids.tolist()) - self._valid_catids)
            if bad:
                raise ValueError(f"image {image_id}: labels {bad} are not category ids of the ground truth")
        else:
            num = len(self._label2catid)
            bad = labels[(labels < 0) | (labels >= num)].tolist()
            if bad:
                raise ValueError(
                    f"image {image_id}: labels {sorted(set(bad))} outside label2catid (expected 0..{num - 1})"
                )
            cat_ids = np.asarray(self._label2catid, dtype=np.int64)[labels.numpy()]
        return cat_ids.astype(np.int64), xywh.numpy(), scores.numpy()

    def synchronize(self) -> None:
        self.merged = merge_gathered(dist_utils.all_gather(self.local))

    def detections(self) -> dict[int, ImageDetections]:
        """The synchronized detections, or this rank's alone when not synchronized yet."""
        return self.merged if self.merged is not None else merge_gathered([self.local])


class _CocoBackend:
    """The few calls that differ between pycocotools and faster-coco-eval."""

    def __init__(self, name: str):
        self.name = name

    def index(self, data: dict[str, Any]) -> Any:
        if self.name == "pycocotools":
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            return coco
        from faster_coco_eval import COCO

        coco = COCO(print_function=_noop)
        coco.dataset = data
        coco.createIndex()
        return coco

    def load_results(self, gt: Any, results: list[dict[str, Any]]) -> Any:
        if not results:
            # pycocotools' loadRes([]) fails (it reads results[0]); an index with the ground
            # truth's images and categories and no annotations evaluates as "nothing detected".
            data = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"])}
            return self.index({**data, "annotations": []})
        # loadRes adds fields to the dicts it is given; pass copies so the results stay clean.
        fresh = [dict(r) for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(fresh)

    def evaluator(self, gt: Any, dt: Any, **kwargs: Any) -> Any:
        if self.name == "pycocotools":
            from pycocotools.cocoeval import COCOeval

            return COCOeval(gt, dt, iouType="bbox")
        from faster_coco_eval import COCOeval_faster

        return COCOeval_faster(gt, dt, iouType="bbox", print_function=_noop, **kwargs)


class CocoOVDEvaluator:
    """COCO box evaluation with the OVD base/novel split (SPEC §6.2).

    Usage: `update(predictions)` per batch, `synchronize_between_processes()`, `accumulate()`,
    `summarize()` → the 16 stats. `results_json()` gives the COCO results list for
    `<output_dir>/results_bbox.json`, `table()` a readable summary, `eval_state()` the
    precision/recall arrays for `eval.pth`.
    """

    def __init__(
        self,
        coco_gt: Any,
        label2catid: Sequence[int] | Mapping[int, int],
        backend: str = "auto",
        *,
        verbose: bool = True,
    ):
        """`coco_gt`: pycocotools / faster-coco-eval COCO object, annotation dict or json path.
        `label2catid[label]`: the dataset category id of model label `label` (index into the
        category list). `verbose`: print the original's evaluation lines (always kept in `log`)."""
        self.backend = resolve_backend(backend)
        self._api = _CocoBackend(self.backend)
        data = _dataset_dict(coco_gt)
        self.coco_gt = self._api.index(data)
        catids = [c["id"] for c in data["categories"]]
        self.label2catid = _label_table(label2catid, catids)
        self.base_catids, self.novel_catids = ovd_split(data["categories"])
        self._store = _DetectionStore(
            image_ids=(img["id"] for img in data["images"]), label2catid=self.label2catid, valid_catids=catids
        )
        self.verbose = verbose
        self.coco_eval: Any = None  # the backend's COCOeval after accumulate(); `.eval` has the arrays
        self.stats: list[float] | None = None
        self.log_lines: list[str] = []

    @property
    def log(self) -> str:
        """Everything accumulate() and summarize() printed, newline-terminated."""
        return "".join(line + "\n" for line in self.log_lines)

    def _emit(self, line: str) -> None:
        self.log_lines.append(line)
        if self.verbose:
            print(line)

    def update(self, predictions: Mapping[Any, Mapping[str, Any]]) -> None:
        """Add `{image_id: {'scores' [N], 'labels' [N] (index into label2catid), 'boxes' [N,4] xyxy px}}`."""
        self._store.add(predictions)

    def synchronize_between_processes(self) -> None:
        """Gather every rank's detections (all ranks must call this); duplicates keep the first."""
        self._store.synchronize()

    @property
    def img_ids(self) -> list[int]:
        """Evaluated image ids (sorted): those given to update(), on every rank once synchronized."""
        return list(self._store.detections())

    def results_json(self) -> list[dict[str, Any]]:
        """COCO results (`image_id`, dataset `category_id`, `bbox` xywh, `score`), by image id."""
        return _coco_results(self._store.detections())

    def accumulate(self) -> None:
        """Match detections to the ground truth and build the precision/recall tables."""
        detections = self._store.detections()
        if not detections:
            raise RuntimeError("CocoOVDEvaluator.accumulate: no image was given to update()")
        self.log_lines = []
        self._emit("Accumulating evaluation results...")
        tic = time.time()
        dt = self._api.load_results(self.coco_gt, _coco_results(detections))
        coco_eval = self._api.evaluator(self.coco_gt, dt)
        coco_eval.params.imgIds = list(detections)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.coco_eval = coco_eval
        self._emit(f"DONE (t={time.time() - tic:0.2f}s).")

    def summarize(self) -> list[float]:
        """The 16 stats `STAT_NAMES` (first 12 fractions, last 4 percent), printed as the original."""
        if self.coco_eval is None:
            raise RuntimeError("CocoOVDEvaluator.summarize: call accumulate() first")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_eval.summarize()
        standard = [float(s) for s in np.asarray(self.coco_eval.stats)[:12]]
        self._emit("IoU metric: bbox")
        iou_thrs = self.coco_eval.params.iouThrs
        for (is_ap, iou, area, max_dets), value in zip(_SUMMARY_ROWS, standard, strict=True):
            iou_str = f"{iou_thrs[0]:0.2f}:{iou_thrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
            title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
            self._emit(_COCO_LINE.format(title, kind, iou_str, area, max_dets, value))
        ap_base, ap_novel, ar_base, ar_novel = self._split_means()
        self._emit(f"bbox AP base: {ap_base}")
        self._emit(f"bbox AP target: {ap_novel}")
        self._emit(f"bbox AR base: {ar_base}")
        self._emit(f"bbox AR target: {ar_novel}")
        self.stats = standard + [ap_base, ap_novel, ar_base, ar_novel]
        return list(self.stats)

    def per_category(self) -> dict[int, tuple[float | None, float | None]]:
        """`{category id: (AP50 %, AR50 %)}` at IoU 0.5, all areas, 100 detections; None where the
        category has no ground truth among the evaluated images."""
        precision = self.coco_eval.eval["precision"]
        recall = self.coco_eval.eval["recall"]
        out = {}
        for k, cat_id in enumerate(self.coco_eval.params.catIds):
            p = precision[0, :, k, 0, -1]
            p = p[p > -1]
            ap = float(np.mean(p) * 100) if p.size else None
            r = float(recall[0, k, 0, -1])
            out[int(cat_id)] = (ap, r * 100 if r > -1 else None)
        return out

    def _split_means(self) -> tuple[float, float, float, float]:
        """Mean per-category AP50 / AR50 (percent) over base and novel categories.

        The column k of the precision table is the k-th sorted ground-truth category id, the same
        category as the original's `label2catid[k]` since labels rank the category ids.
        """
        groups: dict[str, list[list[float]]] = {"base": [[], []], "novel": [[], []]}
        base, novel = self.base_catids, self.novel_catids
        for cat_id, (ap, ar) in self.per_category().items():
            group = "base" if cat_id in base else "novel" if cat_id in novel else None
            if group is None:
                continue
            if ap is not None:
                groups[group][0].append(ap)
            if ar is not None:
                groups[group][1].append(ar)

        def mean(values: list[float]) -> float:
            # The original printed numpy's mean of an empty list: nan.
            return float(np.mean(values)) if values else float("nan")

        return (
            mean(groups["base"][0]),
            mean(groups["novel"][0]),
            mean(groups["base"][1]),
            mean(groups["novel"][1]),
        )

    def table(self) -> str:
        """AP50 for Novel / Base / All (percent) and the 12 standard statistics (percent)."""
        if self.stats is None:
            raise RuntimeError("CocoOVDEvaluator.table: call summarize() first")
        s = self.stats
        rows = [("Novel", s[13]), ("Base", s[12]), ("All", s[1] * 100)]
        lines = ["| split | AP50 |", "|-------|------:|"]
        lines += [f"| {name:<5} | {value:5.2f} |" for name, value in rows]
        lines += ["", "| " + " | ".join(f"{n:>5}" for n in STAT_NAMES[:12]) + " |"]
        lines += ["|" + "|".join("------:" for _ in range(12)) + "|"]
        lines += ["| " + " | ".join(f"{v * 100:5.2f}" for v in s[:12]) + " |"]
        return "\n".join(lines)

    def eval_state(self) -> dict[str, Any]:
        """Accumulated arrays in plain types (for `torch.save`): precision [T,R,K,A,M], recall
        [T,K,A,M], scores, and the parameters that index them."""
        if self.coco_eval is None:
            raise RuntimeError("CocoOVDEvaluator.eval_state: call accumulate() first")
        e, p = self.coco_eval.eval, self.coco_eval.params
        return {
            "precision": np.asarray(e["precision"]),
            "recall": np.asarray(e["recall"]),
            "scores": np.asarray(e["scores"]),
            "counts": list(e["counts"]),
            "iouThrs": np.asarray(p.iouThrs),
            "recThrs": np.asarray(p.recThrs),
            "catIds": [int(c) for c in p.catIds],
            "imgIds": [int(i) for i in p.imgIds],
            "maxDets": list(p.maxDets),
            "areaRngLbl": list(p.areaRngLbl),
            "stats": list(self.stats) if self.stats is not None else None,
            "backend": self.backend,
        }


# lvis-api result key (AR keys take max_dets) → faster-coco-eval `stats_as_dict` key
_LVIS_KEYS: tuple[tuple[str, str], ...] = (
    ("AP", "AP_all"),
    ("AP50", "AP_50"),
    ("AP75", "AP_75"),
    ("APs", "AP_small"),
    ("APm", "AP_medium"),
    ("APl", "AP_large"),
    ("APr", "APr"),
    ("APc", "APc"),
    ("APf", "APf"),
    ("AR@{}", "AR_all"),
    ("ARs@{}", "AR_small"),
    ("ARm@{}", "AR_medium"),
    ("ARl@{}", "AR_large"),
)


def limit_detections_per_image(detections: ImageDetections, max_dets: int) -> ImageDetections:
    """The `max_dets` highest-scoring detections of one image over all categories (LVISResults'
    cap; a stable sort, so ties keep their order)."""
    cat_ids, boxes, scores = detections
    if max_dets < 0 or len(scores) <= max_dets:
        return detections
    keep = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:max_dets]
    return cat_ids[keep], boxes[keep], scores[keep]


class LvisEvaluator:
    """LVIS box evaluation (SPEC §6.3): at most `max_dets` detections per image, federated
    negatives, AP / APr / APc / APf and AR@max_dets, matching the LVIS API (`LVISEval`).

    Every image of the ground truth is evaluated, as `LVISEval` does; images are de-duplicated by
    id across ranks (the original concatenated the ranks' predictions, so padded images counted
    twice).
    """

    def __init__(
        self,
        lvis_gt: Any,
        label2catid: Sequence[int] | Mapping[int, int] | None = None,
        *,
        max_dets: int = 300,
        verbose: bool = True,
    ):
        """`label2catid` None: labels already are LVIS category ids (the original without
        `--label_map`); otherwise `label2catid[label]` is the category id."""
        if not faster_coco_eval_available():
            raise ImportError("LvisEvaluator needs the faster_coco_eval package (its lvis_style evaluation)")
        self._api = _CocoBackend("faster-coco-eval")
        data = _dataset_dict(lvis_gt)
        missing = [c["id"] for c in data["categories"] if c.get("frequency") not in ("r", "c", "f")]
        if missing:
            raise ValueError(f"LVIS categories need 'frequency' in r/c/f; categories {missing[:10]} lack it")
        for img in data["images"]:
            # LVISEval requires both lists on every image; default them so a hand-made json works.
            img.setdefault("neg_category_ids", [])
            img.setdefault("not_exhaustive_category_ids", [])
        self.lvis_gt = self._api.index(data)
        catids = [c["id"] for c in data["categories"]]
        self.label2catid = None if label2catid is None else _label_table(label2catid, catids)
        self._store = _DetectionStore(
            image_ids=(img["id"] for img in data["images"]), label2catid=self.label2catid, valid_catids=catids
        )
        self.max_dets = max_dets
        self.verbose = verbose
        self.lvis_eval: Any = None
        self.results: dict[str, float] | None = None
        self.log_lines: list[str] = []

    def update(self, predictions: Mapping[Any, Mapping[str, Any]]) -> None:
        """Add `{image_id: {'scores', 'labels', 'boxes' xyxy px}}` (PostProcess output, 300 per image)."""
        self._store.add(predictions)

    def synchronize_between_processes(self) -> None:
        self._store.synchronize()

    def results_json(self) -> list[dict[str, Any]]:
        """LVIS results list after the per-image cap, by image id."""
        capped = {
            i: limit_detections_per_image(d, self.max_dets) for i, d in self._store.detections().items()
        }
        return _coco_results(capped)

    def accumulate(self) -> None:
        """Match the (capped) detections against every ground-truth image."""
        self.log_lines = []
        results = self.results_json()
        dt = self._api.load_results(self.lvis_gt, results)
        lvis_eval = self._api.evaluator(self.lvis_gt, dt, lvis_style=True)
        lvis_eval.params.maxDets = [self.max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            lvis_eval.evaluate()
            lvis_eval.accumulate()
        self.lvis_eval = lvis_eval

    def summarize(self) -> dict[str, float]:
        """`{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'APr', 'APc', 'APf', 'AR@300', 'ARs@300',
        'ARm@300', 'ARl@300'}` (fractions; -1 where undefined), printed as LVISEval.print_results."""
        if self.lvis_eval is None:
            raise RuntimeError("LvisEvaluator.summarize: call accumulate() first")
        with contextlib.redirect_stdout(io.StringIO()):
            self.lvis_eval.summarize()
        stats = self.lvis_eval.stats_as_dict
        iou_thrs = self.lvis_eval.params.iouThrs
        self.results = {}
        for key_template, stats_key in _LVIS_KEYS:
            key = key_template.format(self.max_dets)
            value = float(stats[stats_key])
            self.results[key] = value
            # LVISEval.print_results derives the labels from the key's third character.
            title, kind = ("Average Precision", "(AP)") if "AP" in key else ("Average Recall", "(AR)")
            third = key[2] if len(key) > 2 else ""
            iou = (
                f"{float(key[2:]) / 100:0.2f}"
                if third.isdigit()
                else f"{iou_thrs[0]:0.2f}:{iou_thrs[-1]:0.2f}"
            )
            group = third if third in ("r", "c", "f") else "all"
            area = third if third in ("s", "m", "l") else "all"
            line = _LVIS_LINE.format(title, kind, iou, area, self.max_dets, group, value)
            self.log_lines.append(line)
            if self.verbose:
                print(line)
        return dict(self.results)

    def eval_state(self) -> dict[str, Any]:
        """Accumulated arrays in plain types (for `torch.save`, as `CocoOVDEvaluator.eval_state`): precision
        [T,R,K,A,M], recall [T,K,A,M] and the parameters that index them, with the summary."""
        if self.lvis_eval is None:
            raise RuntimeError("LvisEvaluator.eval_state: call accumulate() first")
        e, p = self.lvis_eval.eval, self.lvis_eval.params
        return {
            "precision": np.asarray(e["precision"]),
            "recall": np.asarray(e["recall"]),
            "iouThrs": np.asarray(p.iouThrs),
            "recThrs": np.asarray(p.recThrs),
            "catIds": [int(c) for c in p.catIds],
            "imgIds": [int(i) for i in p.imgIds],
            "maxDets": list(p.maxDets),
            "results": dict(self.results) if self.results is not None else None,
        }

