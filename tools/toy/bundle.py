"""Bundle the toy pipeline's result for `bash demo.sh`: the files under assets/toy/.

    python -m tools.toy.bundle            # after tools/toy/run_all.sh, defaults below

Writes, from the run's outputs:
    assets/toy/clip_toy.pt               the toy CLIP archive (OpenAI format), as trained by stage 2
    assets/toy/region_prompt_toy.pth     the region prompt of stage 3
    assets/toy/cora_toy.pth              the localizer's last-epoch EMA weights without the CLIP tensors (those come
                                         from the two files above) and the run's args: what `Predictor.from_checkpoint`
                                         and demo.py load
    assets/toy/samples/*.jpg             val scenes that hold novel-class objects (held out from every stage's training)
    assets/toy/vocabulary.json           the world's categories (id, name, base / novel), from its val json
    assets/toy/provenance.json           where each file came from, its sha256 and the run's AP50s
The model these files make is exactly the run's final EMA model, so its evaluation is the run's last `log.txt` line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.clip import DETECTOR_CLIP_PREFIXES  # noqa: E402
from tools.toy.report import ap50  # noqa: E402
from util.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from util.run_info import git_sha  # noqa: E402


def detector_only(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the frozen CLIP tensors (trunk, attention pool with the prompt, text tower)."""
    return {k: v for k, v in weights.items() if not k.startswith(DETECTOR_CLIP_PREFIXES)}


def novel_samples(data: Path, count: int) -> list[Path]:
    """The first `count` val images (by id) holding at least one novel and one base object."""
    val = json.loads((data / "annotations" / "instances_val2017_basetarget.json").read_text())
    split = {c["id"]: c.get("split") for c in val["categories"]}
    kinds: dict[int, set[str]] = {}
    for ann in val["annotations"]:
        kinds.setdefault(ann["image_id"], set()).add(split[ann["category_id"]])
    files = {image["id"]: image["file_name"] for image in val["images"]}
    chosen = [i for i in sorted(kinds) if kinds[i] >= {"novel", "base"}][:count]
    return [data / "val2017" / files[i] for i in chosen]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_info(run_dir: Path) -> dict:
    """The localizer run's command line and commit (its latest `run_*.json`, written by main.py)."""
    runs = sorted(run_dir.glob("run_*.json"))
    info = json.loads(runs[-1].read_text()) if runs else {}
    return {"run_argv": info.get("argv"), "run_git_sha": info.get("git_sha")}


def _copy(source: Path, target: Path) -> None:
    if not (target.exists() and target.resolve() == source.resolve()):  # re-bundling from the bundle's own files
        shutil.copyfile(source, target)


def bundle(*, run_dir: Path, clip: Path, prompt: Path, data: Path, out: Path, samples: int = 4,
           made_by: str = "tools/toy/run_all.sh") -> dict:
    checkpoint_path = run_dir / "checkpoint.pth"
    for path, what in ((checkpoint_path, "localizer checkpoint"), (clip, "CLIP archive"), (prompt, "region prompt")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {what} not found (run tools/toy/run_all.sh first)")
    checkpoint = load_checkpoint(checkpoint_path)
    if not isinstance(checkpoint.get("model_ema"), dict):
        raise ValueError(f"{checkpoint_path}: no model_ema weights (the toy config trains with --model_ema)")
    out.mkdir(parents=True, exist_ok=True)
    weights = detector_only(checkpoint["model_ema"])
    target = out / "cora_toy.pth"
    save_checkpoint({"model": weights, "args": checkpoint["args"], "epoch": checkpoint.get("epoch")}, target)
    _copy(clip, out / "clip_toy.pt")
    _copy(prompt, out / "region_prompt_toy.pth")
    sample_dir = out / "samples"
    if sample_dir.exists():
        shutil.rmtree(sample_dir)
    sample_dir.mkdir()
    for image in novel_samples(data, samples):
        shutil.copyfile(image, sample_dir / image.name)
    val = json.loads((data / "annotations" / "instances_val2017_basetarget.json").read_text())
    vocabulary = {"categories": [{"id": c["id"], "name": c["name"], "split": c["split"]}
                                 for c in sorted(val["categories"], key=lambda c: c["id"])]}
    (out / "vocabulary.json").write_text(json.dumps(vocabulary, indent=1) + "\n")
    files = sorted([target, out / "clip_toy.pt", out / "region_prompt_toy.pth", out / "vocabulary.json",
                    *sample_dir.iterdir()])
    record = {
        "made_by": f"{made_by}, then python -m tools.toy.bundle --run_dir {run_dir}",
        "git_sha": git_sha(),  # of the bundling ("-dirty": uncommitted changes)
        **_run_info(run_dir),
        "run": str(run_dir), "epoch": checkpoint.get("epoch"), "val_ap50": ap50(run_dir),
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (out / "provenance.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("toy bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", type=Path, default=Path("logs/toy/toy_dab_ovd_apm_splcls0.2_relabel/toy"))
    p.add_argument("--clip", type=Path, default=Path("data/toy/clip_toy.pt"))
    p.add_argument("--prompt", type=Path, default=Path("logs/region_prompt_toy.pth"))
    p.add_argument("--data", type=Path, default=Path("data/toy"), help="the world (val images for the samples)")
    p.add_argument("--out", type=Path, default=Path("assets/toy"))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--made_by", default="tools/toy/run_all.sh", help="the script whose run this is (provenance)")
    args = p.parse_args(argv)
    record = bundle(run_dir=args.run_dir, clip=args.clip, prompt=args.prompt, data=args.data, out=args.out,
                    samples=args.samples, made_by=args.made_by)
    print(json.dumps({k: record[k] for k in ("run", "epoch", "val_ap50")}))
    megabytes = sum(f["bytes"] for f in record["files"].values()) / 1e6
    print(f"{len(record['files'])} files, {megabytes:.1f} MB -> {args.out}")
    return record


if __name__ == "__main__":
    main()
