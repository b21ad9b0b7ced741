"""Read the toy pipeline's outputs: whether a localizer run has finished, its AP50s, the ablation table.

    python -m tools.toy.report finished logs/toy/toy_dab_ovd_apm_splcls0.2_relabel/toy   # exit 0 when done
    python -m tools.toy.report summary logs/toy/toy_dab_ovd_apm_splcls0.2_relabel/toy    # one line of AP50s
    python -m tools.toy.report ablation --out logs/toy/ablation.md                        # README's table
    python -m tools.toy.report record localizer 735           # a stage's wall time into logs/toy/run_all_times.json

A localizer run is its config's work dir (`log.txt` with one JSON line per epoch, `run_*.json` with
the resolved args, as main.py writes them). Numbers are those of the last epoch (the EMA model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LOCALIZER = Path("logs/toy/toy_dab_ovd_apm_splcls0.2_relabel")
REGION_ACCURACY = Path("logs/toy/region_prompt_toy/toy/region_accuracy.json")
TIMES = Path("logs/toy/run_all_times.json")
# (work dir under LOCALIZER, what differs from CORA) in the table's order; tools/toy/ablation.sh runs them
VARIANTS = (
    ("toy", "CORA: anchor pre-matching, region prompt, CLIP-aligned labels (the bundled model)"),
    ("noapm", "class-agnostic queries (no anchor pre-matching)"),
    ("annotated", "annotated labels (no CLIP-aligned labelling)"),
)


def epochs_logged(folder: Path) -> list[dict[str, Any]]:
    log = folder / "log.txt"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if "epoch" in r]  # not the lines of --eval runs


def finished(folder: Path) -> bool:
    """True when `log.txt` records the last epoch that the latest run's args ask for."""
    runs = sorted(folder.glob("run_*.json"))
    logged = epochs_logged(folder)
    if not runs or not logged:
        return False
    return logged[-1]["epoch"] + 1 >= json.loads(runs[-1].read_text())["args"]["epochs"]


def ap50(folder: Path) -> dict[str, float] | None:
    """Novel / base / all AP50 (percent) of the last logged epoch, or None."""
    logged = epochs_logged(folder)
    stats = logged[-1].get("test_coco_eval_bbox") if logged else None
    if not stats:
        return None
    return {"novel": stats[13], "base": stats[12], "all": 100 * stats[1], "epoch": logged[-1]["epoch"]}


def summary(folder: Path) -> str:
    result = ap50(folder)
    if result is None:
        return f"{folder}: no evaluation logged"
    return f"novel AP50 {result['novel']:.2f}  base AP50 {result['base']:.2f}  all AP50 {result['all']:.2f}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


EXTENSIONS = Path("logs/toy/extensions")  # what tools/toy/cora_plus_lvis.sh writes


def _coco_cells(stats) -> str:
    if not stats:
        return "- | - | -"
    return f"{stats[13]:.1f} | {stats[12]:.1f} | {100 * stats[1]:.1f}"


def extensions_table(*, folder: Path = EXTENSIONS, localizer: Path = LOCALIZER) -> str:
    """Markdown: the novel boost on the bundled model, CORA+ (pseudo-box quality, val and unseen-world AP50)
    and the LVIS-format run (APr / APc / APf / AP)."""
    lines = ["| model | val novel | val base | val all | unseen novel | unseen base | unseen all |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("tcf1", "CORA (bundled), --target_class_factor 1", eval_stats),
            ("tcf8", "CORA (bundled), --target_class_factor 8", eval_stats),
            ("cora_plus", "CORA+, pseudo boxes >= 0.2 (the original's threshold)", _last_test_stats),
            ("cora_plus_thr0.15", "CORA+, pseudo boxes >= 0.15", _last_test_stats)]
    for exp, label, val_stats in rows:
        val, unseen = val_stats(localizer / exp), eval_stats(localizer / f"{exp}_unseen")
        if val or unseen:
            lines.append(f"| {label} | {_coco_cells(val)} | {_coco_cells(unseen)} |")
    qualities = sorted(folder.glob("pseudo_quality_thr*.json"), reverse=True)
    if qualities:
        lines += ["", "| pseudo boxes vs the world's true boxes | novel boxes | precision | recall | base boxes | "
                      "precision | recall |", "|---|---:|---:|---:|---:|---:|---:|"]
        for path in qualities:
            q = json.loads(path.read_text())
            cells = [f"{q[g]['pseudo_boxes']} | {_fmt(q[g]['precision'])} | {_fmt(q[g]['recall'])}"
                     for g in ("novel", "base")]
            lines.append(f"| score >= {path.stem[len('pseudo_quality_thr'):]} | " + " | ".join(cells) + " |")
    lvis = _last_test_stats(Path("logs/LVIS/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit/toy"))
    if lvis:
        lines += ["", "| LVIS format (configs/LVIS at toy size) | APr | APc | APf | AP |", "|---|---:|---:|---:|---:|",
                  "| CORA | " + " | ".join(f"{100 * lvis[k]:.1f}" for k in ("APr", "APc", "APf", "AP")) + " |"]
    return "\n".join(lines)


def _last_test_stats(folder: Path):
    logged = epochs_logged(folder)
    return logged[-1].get("test_coco_eval_bbox") if logged else None


def ablation_table(*, localizer: Path = LOCALIZER, region_accuracy: Path = REGION_ACCURACY,
                   times: Path = TIMES) -> str:
    """Markdown: region classification accuracy with / without the prompt, then the localizer variants."""
    lines = ["| region classification of val ground-truth boxes | base | novel | all |", "|---|---:|---:|---:|"]
    if region_accuracy.is_file():
        results = json.loads(region_accuracy.read_text())["results"]
        rows = (("CLIP (no prompt)", "CLIP"), ("region prompt", "CLIP + region prompt"),
                ("CLIP (no prompt), pre-matching path", "CLIP, anchor pre-matching's pooling (layer4)"),
                ("region prompt, pre-matching path", "CLIP + region prompt, anchor pre-matching's pooling"))
        for name, label in rows:
            if name not in results:  # a report written before the pre-matching rows existed
                continue
            r = results[name]
            lines.append(f"| {label} | " + " | ".join(_fmt(None if r[s] is None else 100 * r[s])
                                                      for s in ("base", "novel", "all")) + " |")
    lines += ["", "| localizer (val AP50, last epoch) | novel | base | all |", "|---|---:|---:|---:|"]
    for exp, label in VARIANTS:
        result = ap50(localizer / exp)
        cells = [_fmt(None if result is None else result[k]) for k in ("novel", "base", "all")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if times.is_file():
        seconds = json.loads(times.read_text())
        lines += ["", "wall time (s, 2 CPU cores): " + ", ".join(f"{k} {v}" for k, v in seconds.items())]
    return "\n".join(lines)


def eval_stats(folder: Path) -> list | dict | None:
    """The statistics of the last `main.py --eval` line of a run folder's log.txt (COCO: 16 numbers; LVIS: a dict)."""
    log = folder / "log.txt"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval" in r]
    return evals[-1]["test_coco_eval_bbox"] if evals else None


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two xywh boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def pseudo_box_quality(boxes: list[dict], truth: dict, iou: float = 0.5) -> dict[str, dict[str, float]]:
    """Precision and recall of pseudo boxes against the world's true boxes of every class
    (`instances_train2017_all.json`): a pseudo box is right when it overlaps a not yet claimed true box of
    its class with IoU >= `iou` (greedy by score, as detection evaluation matches). Split by base / novel."""
    names = {c["id"]: c["name"] for c in truth["categories"]}
    split = {c["name"]: c.get("split", "base") for c in truth["categories"]}
    true_boxes: dict[tuple[int, str], list[list[float]]] = {}
    for a in truth["annotations"]:
        true_boxes.setdefault((a["image_id"], names[a["category_id"]]), []).append(a["bbox"])
    claimed: set[tuple[int, str, int]] = set()
    right = {"base": 0, "novel": 0}
    made = {"base": 0, "novel": 0}
    for b in sorted(boxes, key=lambda b: -b["score"]):
        group = split.get(b["class_label"], "novel")
        made[group] += 1
        candidates = true_boxes.get((b["image_id"], b["class_label"]), [])
        best = max(((_iou(b["bbox"], t), k) for k, t in enumerate(candidates)
                    if (b["image_id"], b["class_label"], k) not in claimed), default=(0.0, -1))
        if best[0] >= iou:
            claimed.add((b["image_id"], b["class_label"], best[1]))
            right[group] += 1
    total = {"base": 0, "novel": 0}
    for (_, name), found in true_boxes.items():
        total[split[name]] += len(found)
    return {g: {"pseudo_boxes": made[g], "correct": right[g], "true_boxes": total[g],
                "precision": 100 * right[g] / made[g] if made[g] else None,
                "recall": 100 * right[g] / total[g] if total[g] else None} for g in ("base", "novel")}


def record(stage: str, seconds: int, times: Path = TIMES) -> None:
    data = json.loads(times.read_text()) if times.is_file() else {}
    data[stage] = seconds
    times.parent.mkdir(parents=True, exist_ok=True)
    times.write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("toy report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("finished", "summary"):
        sub.add_parser(name).add_argument("folder", type=Path)
    timing = sub.add_parser("record")
    timing.add_argument("stage")
    timing.add_argument("seconds", type=int)
    table = sub.add_parser("ablation")
    table.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    quality = sub.add_parser("pseudo", help="precision / recall of pseudo boxes against the true boxes")
    quality.add_argument("boxes", type=Path)
    quality.add_argument("truth", type=Path)
    quality.add_argument("--out", type=Path, required=True)
    extensions = sub.add_parser("extensions", help="the CORA+ / LVIS / novel-boost table (cora_plus_lvis.sh)")
    extensions.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.command == "pseudo":
        result = pseudo_box_quality(json.loads(args.boxes.read_text()), json.loads(args.truth.read_text()))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return 0
    if args.command == "extensions":
        text = extensions_table()
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return 0
    if args.command == "finished":
        return 0 if finished(args.folder) else 1
    if args.command == "record":
        record(args.stage, args.seconds)
        return 0
    if args.command == "summary":
        print(summary(args.folder))
        return 0
    text = ablation_table()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
