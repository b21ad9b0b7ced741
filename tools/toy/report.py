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
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


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
    args = p.parse_args(argv)
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
