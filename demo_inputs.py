"""What the demos run on (demo.py, demo_web.py): the checkpoint, the vocabulary and the input images.

Without a checkpoint (no `--resume`, no $CORA_CHECKPOINT, no checkpoints/cora_rn50.pth) the demos use
the model tools/toy/run_all.sh trained on the miniature world (assets/toy/), with its 16 class names;
a published CORA checkpoint is needed for real photos. Vocabularies: the 65 COCO-OVD names, LVIS's
1203 (from an LVIS json, rare classes boosted), a custom list, or the toy world's.
"""
from __future__ import annotations

import glob
import json
import os
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
TOY_VOCABULARY = ROOT / "assets" / "toy" / "vocabulary.json"
CHECKPOINT_ENV = "CORA_CHECKPOINT"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ORIGINAL_REPOSITORY = "https://github.com/tgxs002/CORA"
# The original README's Model Zoo (COCO OVD, novel AP50).
PUBLISHED_CHECKPOINTS = (
    ("CLIP RN50, novel AP50 35.1", "https://drive.google.com/file/d/1lQmFrbfaZutlA72gi-VOAHOvGuHSYMbo/view"),
    ("CLIP RN50x4, novel AP50 41.7", "https://drive.google.com/file/d/115osjVyv86vjG_b0W83vPQryXxdIDsv_/view"),
)
OVD_VAL_JSONS = ("instances_val2017_basetarget.json", "instances_val2017.json")


class DemoError(Exception):
    """A problem with the command line or the files it names; printed without a traceback."""


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


def toy_vocabulary() -> tuple[list[str], list[int], None]:
    """The bundled toy model's 16 class names and category ids (assets/toy/vocabulary.json)."""
    categories = json.loads(TOY_VOCABULARY.read_text())["categories"]
    return [c["name"] for c in categories], [c["id"] for c in categories], None


def choose_vocabulary(args) -> tuple[list[str], list[int] | None, list[int] | None]:
    """`(names, category ids or None, indices boosted by target_class_factor or None)`."""
    from datasets.coco_ovd import COCO_OVD_CATEGORIES, COCO_OVD_CATEGORY_IDS
    from models.predictor import normalize_vocabulary

    given = args.custom_vocabulary is not None  # "" given on purpose is an error below, not the COCO default
    kind = args.vocabulary or ("custom" if given else "coco")
    if given and kind != "custom":
        raise DemoError(f"--custom_vocabulary was given with --vocabulary {kind}; use one of them")
    if kind == "coco":
        return list(COCO_OVD_CATEGORIES), list(COCO_OVD_CATEGORY_IDS), None
    if kind == "lvis":
        names, ids, rare = lvis_vocabulary(args.lvis_json)
        return names, ids, rare
    if not given or not args.custom_vocabulary.strip():
        raise DemoError(f'--vocabulary custom needs --custom_vocabulary "name1,name2,..." (given: '
                        f'{args.custom_vocabulary!r})')
    try:
        return list(normalize_vocabulary(args.custom_vocabulary.split(","))), None, None
    except ValueError as e:
        raise DemoError(f"--custom_vocabulary {args.custom_vocabulary!r}: {e}") from e



def detection_rows(dets, *, image_id, file_name, category_ids):
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
