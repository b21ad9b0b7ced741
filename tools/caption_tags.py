"""Image-level class tags from captions, for CORA+ pseudo-labelling (`tools/pseudo_label.py --cls_annotation_path`).

    python tools/caption_tags.py --captions data/coco/annotations/captions_train2017.json \\
        --categories data/coco/annotations/instances_val2017_basetarget.json \\
        --out data/coco/annotations/coco_train_tags.json [--synonyms synonyms.json]

The original repository reads a tag file `{image_id: [class names]}` that it does not ship. This
derives one from a COCO-captions-style json (`{"annotations": [{"image_id", "caption"}, ...]}`): an
image is tagged with a class when one of its captions names it, as a whole word or phrase, in the
singular or a regular plural ("cat", "cats"; "bus", "buses"; "strawberry", "strawberries"), ignoring
case and punctuation. Each class is matched by its name (LVIS's `_` read as spaces, a parenthesised
qualifier such as "speaker_(stereo_equipment)" dropped), the json's own `synonyms` when its
categories have them (LVIS), and `--synonyms` (`{class name: [phrases]}`, e.g. `{"tv": ["television"]}`).
Tags are written under the category names the detector is given (the json's, `_` as spaces as the
LVIS loader reads them), sorted; images whose captions name no class are left out (and counted).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.atomic import write_json  # noqa: E402


def phrase_variants(phrase: str) -> set[str]:
    """The phrase as captions may write it: lower case, `_` as spaces, without a parenthesised qualifier."""
    phrase = phrase.replace("_", " ").lower()
    plain = re.sub(r"\s*\([^)]*\)", "", phrase)
    return {" ".join(p.split()) for p in (phrase, plain) if p.strip()}


def _pattern(phrases: Iterable[str]) -> re.Pattern:
    """Whole-word match of any phrase, its last word in the singular or a regular plural."""
    alternatives = []
    for phrase in sorted(set(phrases), key=len, reverse=True):
        words = [re.escape(w) for w in phrase.split()]
        last = words[-1]
        plural = (f"(?:{last[:-1]}ies|{last}s)" if phrase.endswith("y") and len(phrase) > 1
                  else f"(?:{last}es|{last}s)")
        body = r"\s+".join(words[:-1] + [f"(?:{last}|{plural})"])
        alternatives.append(body)
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(alternatives) + r")(?![a-z0-9])")


def normalise_caption(caption: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9()]+", " ", caption.lower()).split())


def class_matchers(categories: Sequence[Mapping], synonyms: Mapping[str, Sequence[str]]) -> dict[str, re.Pattern]:
    """Detector class name -> the pattern of every phrase that names it."""
    known = {c["name"].replace("_", " ") for c in categories}
    unknown = sorted(set(synonyms) - known - {c["name"] for c in categories})
    if unknown:
        raise ValueError(f"--synonyms: {unknown[:10]} are not category names of --categories "
                         f"(e.g. {sorted(known)[:5]})")
    matchers = {}
    for c in categories:
        name = c["name"].replace("_", " ")
        phrases = phrase_variants(c["name"])
        for synonym in [*c.get("synonyms", ()), *synonyms.get(c["name"], ()), *synonyms.get(name, ())]:
            phrases |= phrase_variants(synonym)
        matchers[name] = _pattern(phrases)
    return matchers


def caption_tags(captions: Sequence[Mapping], categories: Sequence[Mapping],
                 synonyms: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """`{str(image_id): sorted class names}` for the images whose captions name at least one class."""
    matchers = class_matchers(categories, synonyms or {})
    texts: dict[int, list[str]] = {}
    for i, ann in enumerate(captions):
        if not isinstance(ann, Mapping) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"caption #{i}: expected {{'image_id', 'caption': str}}, found {ann!r}"[:200])
        texts.setdefault(ann["image_id"], []).append(normalise_caption(ann["caption"]))
    tags = {}
    for image_id, lines in texts.items():
        text = " | ".join(lines)
        names = sorted(name for name, pattern in matchers.items() if pattern.search(text))
        if names:
            tags[str(image_id)] = names
    return tags


def _read_json(path: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: not valid JSON ({e})") from e


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("image-level class tags from captions", add_help=True)
    p.add_argument("--captions", default="", help="COCO-captions-style json ({'annotations': [{image_id, caption}]})")
    p.add_argument("--categories", default="", help="a detection json whose 'categories' are the classes to tag")
    p.add_argument("--synonyms", default="", help="optional json {class name: [phrases that also name it]}")
    p.add_argument("--out", default="", help="tag file {image_id: [class names]} for tools/pseudo_label.py")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, list[str]]:
    args = get_args_parser().parse_args(argv)
    for flag in ("captions", "categories", "out"):
        if not getattr(args, flag):
            raise SystemExit(f"caption_tags.py: --{flag} is required")
    captions = _read_json(args.captions, "--captions")
    if not isinstance(captions, Mapping) or not isinstance(captions.get("annotations"), list):
        raise ValueError(f"--captions {args.captions}: expected a json object with an 'annotations' list")
    categories = _read_json(args.categories, "--categories")
    if not isinstance(categories, Mapping) or not categories.get("categories"):
        raise ValueError(f"--categories {args.categories}: expected a detection json with 'categories'")
    synonyms = _read_json(args.synonyms, "--synonyms") if args.synonyms else {}
    tags = caption_tags(captions["annotations"], categories["categories"], synonyms)
    images = {a["image_id"] for a in captions["annotations"]}
    write_json(tags, args.out)
    counts: dict[str, int] = {}
    for names in tags.values():
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    print(f"{len(tags)} of {len(images)} captioned images tagged ({len(images) - len(tags)} name no class); "
          f"{sum(counts.values())} tags over {len(counts)} classes -> {args.out}")
    return tags


if __name__ == "__main__":
    main()
