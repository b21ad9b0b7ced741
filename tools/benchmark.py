"""Side-by-side timings of the exact fast paths against the reference paths, in one run (issue 8).

    python tools/benchmark.py                 # everything (hours on a 2-core CPU: RN50x4 at 800×1216 × 1000 boxes)
    python tools/benchmark.py --quick         # the golden miniature, RN50 at 480×640, fewer repetitions
    python tools/benchmark.py --sections match,ovd --out bench.json
    python tools/benchmark.py --sections peak,eval --breakdown --eval_plans R50:800x1202,R50x4:800x800 --reps 1

Sections (each timing is the median of `--reps` repetitions after one warm-up):

* peak: this machine's float32 floor: a 4096³ matmul and a large 3x3 convolution (channels-last and
  NCHW), best of `--reps`, in GFLOP/s.
* eval: seconds per image of `models.inference.detect`, three paths alternating: the reference (the
  code before issue 19: `models.backbone.reference_eval()`, its default pruned scoring), the fast
  path scoring every query (`--no_prune_eval`) and the fast path's default (pruned); with the
  fraction of queries scored, whether the fast path's two modes give identical detections (labels,
  boxes, queries, order, bit-equal scores) and how the fast path's detections compare with the
  reference's (same labels, queries and order; largest relative score and box difference: folding
  and reordered sums change rounding only). `--breakdown` adds where the time goes (backbone, text,
  pre-matching, transformer, region head with its stopping checks, PostProcess) for the reference
  and the fast pruned path, and the region head's executed GFLOP/s (FLOPs counted by
  `torch.utils.flop_counter`) next to the measured peak. Models: the bundled toy-world model
  (assets/toy, on its sample scenes: a trained
  model's score distribution), the golden miniature (its weights, its two photos)
  and random-weight RN50 / RN50x4 (`build_cora` with the published configs' flags) at 480×640 and
  800×1216. Each but the toy also under
  "trained-like scores": a fixed per-query objectness offset N(−4, 2.5²) and class-separating text
  features, because random weights give every query nearly the same objectness and nearly uniform
  class probabilities, under which nothing can be ruled out (the bound is the objectness).
* chunk: the fast region head's time per box against its layer4 chunk size (`FAST_CHUNK`), RN50 and
  RN50x4, on 256 boxes of one image.
* precision: the Predictor's opt-in bf16 (`--precision bf16` of demo.py) against fp32, where the device
  has native bfloat16: time and novel / base / all AP50 of the bundled toy model on 200 scenes of a toy
  world it never saw, and detection time of random-weight RN50 at 480x640.
* train: one training iteration (forward, losses, backward, clip, AdamW) of the golden miniature,
  and of random RN50 at 480×640 (batch 2) without --quick.
* match: the matcher of every decoder layer (6 layers, Q = 1000, boxes per image 5/20/50, batch
  1/4/8), costs included: scipy per image (with its device → host copies) vs the torch solver per
  layer vs the torch solver on all layers in one batch (what the criterion does);
  on the CPU and, when present, on CUDA.
* ovd: CocoOVDEvaluator on a synthetic 500-image COCO-OVD set (65 classes, 100 detections per
  image): pycocotools vs faster-coco-eval, with the largest difference between their 16 statistics.

Prints a table and writes JSON (`--out`, default benchmark.json) with the machine description.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.coco_ovd import BASE_CATIDS, COCO_OVD_CATEGORIES, COCO_OVD_TABLE, NOVEL_CATIDS  # noqa: E402
from datasets.ovd_eval import CocoOVDEvaluator  # noqa: E402
from models import ModelConfig, build_cora  # noqa: E402
from models.assignment import torch_assignment  # noqa: E402
from models.backbone import reference_eval  # noqa: E402
from models.clip import KNOWN_ARCHITECTURES  # noqa: E402
from models.criterion import class_agnostic_targets  # noqa: E402
from models.inference import detect  # noqa: E402
from models.matcher import MASKED_COST, HungarianMatcher, scipy_assignment  # noqa: E402
from models.postprocess import PostProcess  # noqa: E402
from util.nested_tensor import NestedTensor  # noqa: E402

CONFIGS = {name: ROOT / "configs" / "COCO" / f"{name}_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh"
           for name in ("R50", "R50x4")}


def timed(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    """Median seconds of `reps` calls after one warm-up call; returns (median, last result)."""
    result = fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_many(fns: list[Callable[[], object]], reps: int,
               sync: Callable[[], None] = lambda: None) -> list[tuple[float, object]]:
    """Like `timed` for several functions, run in turn so that load from other processes on a shared
    machine falls on all alike, the order rotated every repetition ((a, b, c), (b, c, a), ...) so that
    none always runs after the same one (caches, allocator); per function (median seconds, last result)."""
    results = [fn() for fn in fns]
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        for k in range(len(fns)):
            i = (rep + k) % len(fns)
            start = time.perf_counter()
            results[i] = fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), r) for t, r in zip(times, results, strict=True)]


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- models


def config_flags(name: str) -> list[str]:
    """The published config's flags (configs/COCO/*.sh), without paths and run bookkeeping."""
    text = CONFIGS[name].read_text()
    body = text[text.index('args="') + len('args="'):]
    body = body[: body.index('"')]
    tokens = body.replace("\\", " ").split()
    drop_with_value = {"--coco_path", "--output_dir", "--region_prompt_path", "--label_version", "--save_every_epoch"}
    flags, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in drop_with_value:
            skip = True
        else:
            flags.append(token)
    return flags


def random_model(name: str, **overrides) -> tuple[nn.Module, argparse.Namespace]:
    """The published config's detector with random CLIP and detector weights."""
    from main import get_args_parser

    args = get_args_parser().parse_args(config_flags(name))
    for key, value in overrides.items():
        setattr(args, key, value)
    arch = KNOWN_ARCHITECTURES["RN50" if name == "R50" else "RN50x4"]
    torch.manual_seed(0)
    return build_cora(ModelConfig.from_args(args), arch), args


def toy_case():
    """The bundled toy-world model (assets/toy, `bash demo.sh`'s default) on the bundled toy scenes, preprocessed
    as its training run (val resize at its --image_scale): (model, samples, categories, sizes)."""
    import demo_inputs
    from models.predictor import Predictor
    from util.nested_tensor import nested_tensor_from_tensor_list

    predictor = Predictor.from_checkpoint(demo_inputs.TOY_CHECKPOINT, clip_archive=demo_inputs.TOY_CLIP,
                                          region_prompt=demo_inputs.TOY_PROMPT, device="cpu", disk_cache=False)
    prepared = [predictor.preprocess(path) for path in sorted(demo_inputs.TOY_SAMPLES_DIR.iterdir())]
    sizes = torch.tensor([list(tensor.shape[-2:]) for tensor, _ in prepared])  # no resize at 256 px: original size
    names, _, _ = demo_inputs.toy_vocabulary()
    return predictor.model, nested_tensor_from_tensor_list([t for t, _ in prepared]), names, sizes


def golden_dir() -> Path | None:
    """A full golden folder (the original's outputs on its miniature model): $CORA_GOLDEN_DIR, else
    ../shared/golden beside the repository; None when there is none (its rows are then left out)."""
    folder = Path(os.environ.get("CORA_GOLDEN_DIR") or ROOT.parent / "shared" / "golden")
    return folder if (folder / "checkpoint_tiny.pth").is_file() else None


def golden_args(folder: Path, **overrides) -> argparse.Namespace:
    """The miniature model's flags (its config.json) with its CLIP archive and region prompt."""
    from main import get_args_parser

    args = get_args_parser().parse_args(json.loads((folder / "config.json").read_text())["argv"])
    args.model_path, args.region_prompt_path = str(folder / "clip_tiny.pt"), str(folder / "region_prompt_tiny.pth")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def golden_load(folder: Path, name: str):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(folder / name, map_location="cpu", weights_only=True)


def golden_model(folder: Path) -> tuple[nn.Module, dict]:
    from util.checkpoint import pick_weights

    model, _, _ = __import__("models").build_model(golden_args(folder))
    model.load_state_dict(pick_weights(golden_load(folder, "checkpoint_tiny.pth"), use_ema=True), strict=True)
    return model, golden_load(folder, "inputs.pth")


class SpreadObjectness(nn.Module):
    """Objectness head + a fixed per-query offset: a trained detector's few confident queries."""

    def __init__(self, head: nn.Module, offsets: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("offsets", offsets)

    def forward(self, hs: torch.Tensor) -> torch.Tensor:  # [L,B,Q,d] -> [L,B,Q,1]
        return self.head(hs) + self.offsets[:, None]


class FixedText(nn.Module):
    """Class-separating text features (random unit vectors): peaked class probabilities."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.register_buffer("text", text)

    def forward(self, categories) -> torch.Tensor:
        return self.text[: len(categories)]


def trained_like(model: nn.Module, num_classes: int) -> None:
    gen = torch.Generator().manual_seed(5)
    queries = model.query_embed.weight.shape[0]
    dim = model.text_proj.layers[0].in_features
    model.objectness_embed = SpreadObjectness(model.objectness_embed, torch.randn(queries, generator=gen) * 2.5 - 4.0)
    model.classifier = FixedText(nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=-1))


def compare_detections(full: list[dict], pruned: list[dict]) -> tuple[bool, float]:
    """(identical: same labels, boxes, queries, order and scores; largest relative score difference at
    equal positions, which must be 0: both paths score the same chunks)."""
    same, worst = True, 0.0
    for a, b in zip(full, pruned, strict=True):
        same &= all(torch.equal(a[k], b[k]) for k in ("labels", "query_index", "boxes", "scores"))
        if a["scores"].shape == b["scores"].shape and a["scores"].numel():
            worst = max(worst, ((a["scores"] - b["scores"]).abs() / a["scores"].abs()).max().item())
    return same, worst


def compare_with_reference(ref: list[dict], new: list[dict], sizes: torch.Tensor, rel: float = 1e-4) -> dict:
    """The fast path's detections against the reference's, whose rounding differs. `same_detections`: the
    same (query, label) pairs, except exchanges at the K-th place between pairs whose scores agree to
    `rel`, and at every position scores within `rel` (so only near-ties, ~1e-6 apart with random
    weights, may swap places); `same_order`: the pairs in exactly the same order. The largest relative
    score difference of a pair and the largest box coordinate difference as a fraction of the image's
    longer side."""
    same, order, score_rel, box_rel = True, True, 0.0, 0.0
    for a, b, size in zip(ref, new, sizes, strict=True):
        if len(a["scores"]) != len(b["scores"]):
            same = order = False
            continue
        if not len(a["scores"]):
            continue
        tol = rel * a["scores"].max().item()
        ours, theirs = ({(int(q), int(lab)): (sc, box) for q, lab, sc, box in
                         zip(r["query_index"], r["labels"], r["scores"], r["boxes"])} for r in (b, a))
        for key in ours.keys() ^ theirs.keys():
            cut = (b if key in ours else a)["scores"][-1]
            same &= abs(float((ours.get(key) or theirs.get(key))[0] - cut)) <= tol
        for key in ours.keys() & theirs.keys():
            score_rel = max(score_rel, abs(float(ours[key][0] - theirs[key][0])) / float(theirs[key][0]))
            box_rel = max(box_rel, float((ours[key][1] - theirs[key][1]).abs().max() / size.max()))
        same &= bool(((a["scores"] - b["scores"]).abs() <= tol).all())
        order &= torch.equal(a["labels"], b["labels"]) and torch.equal(a["query_index"], b["query_index"])
    return {"same_detections": same, "same_order": order, "score_rel_diff": score_rel, "box_diff_of_side": box_rel}


@contextlib.contextmanager
def stage_timer(model: nn.Module, post: PostProcess, sync: Callable[[], None]):
    """Seconds spent per evaluation stage while the block runs `detect(model, ..., postprocess=post)`:
    'network' (CORA.forward) with 'backbone', 'text', 'prematch' inside it, 'region' (region scoring with
    its stopping checks) with 'checks' inside it, 'postprocess'. The functions are wrapped, not changed."""
    import models.detector
    import models.inference
    import models.pruned_eval

    times: dict[str, float] = {}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed_fn(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return timed_fn

    functions = [(models.detector, "prematch_anchors", "prematch"),
                 (models.inference, "pruned_detection_logits", "region"), (models.pruned_eval, "_can_stop", "checks")]
    instances = [(model, "network"), (model.backbone, "backbone"), (model.classifier, "text"), (post, "postprocess")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in functions]
    try:
        for module, name, stage in functions:
            setattr(module, name, wrap(stage, getattr(module, name)))
        for obj, stage in instances:
            obj.forward = wrap(stage, obj.forward)  # an instance attribute: nn.Module.__call__ finds it first
        yield times
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
        for obj, _ in instances:
            del obj.forward


def stage_seconds(times: dict[str, float], total: float, images: int) -> dict[str, float]:
    """Per image: backbone, text, pre-matching, transformer (the rest of CORA.forward: input_proj,
    encoder, decoder, heads), region head (its stopping checks apart), PostProcess, other."""
    network = times.get("network", 0.0)
    inner = sum(times.get(k, 0.0) for k in ("backbone", "text", "prematch"))
    region = times.get("region", 0.0)
    out = {"backbone": times.get("backbone", 0.0), "text": times.get("text", 0.0),
           "prematch": times.get("prematch", 0.0), "transformer": network - inner,
           "region_head": region - times.get("checks", 0.0), "stop_checks": times.get("checks", 0.0),
           "postprocess": times.get("postprocess", 0.0)}
    out["other"] = total - network - region - out["postprocess"]
    return {k: v / images for k, v in out.items()}


def region_head_flops(run: Callable[[], object]) -> float:
    """FLOPs (matmuls and convolutions, as torch.utils.flop_counter counts them) of the region scoring
    inside one `run()`. The counter does not see oneDNN's fused convolutions, so this run takes the
    generic convolutions of the fast path (the same arithmetic); torchvision's RoIAlign (the reference)
    is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    import models.inference
    import models.region_head

    original = models.inference.pruned_detection_logits
    available = models.region_head._PackedConvs.available
    counter = FlopCounterMode(display=False)

    def counted(*args, **kwargs):
        with counter:
            return original(*args, **kwargs)

    models.inference.pruned_detection_logits = counted
    models.region_head._PackedConvs.available = staticmethod(lambda device: False)
    try:
        run()
    finally:
        models.inference.pruned_detection_logits = original
        models.region_head._PackedConvs.available = available
    return float(counter.get_total_flops())


def bench_eval_model(label: str, model: nn.Module, samples, categories, sizes, reps: int, device,
                     breakdown: bool = False) -> dict:
    """The reference (pre-issue-19 code, its default pruned scoring), the fast path scoring every query
    and the fast path's default, alternating (`timed_many`)."""
    model.eval().to(device)
    samples = samples.to(device)
    post = PostProcess()
    images = sizes.shape[0]
    target_sizes = sizes.to(device)

    def run(prune: bool, reference: bool = False):
        with reference_eval() if reference else contextlib.nullcontext():
            return detect(model, samples, categories, postprocess=post, target_sizes=target_sizes, prune=prune)

    sync = cuda_sync if device.type == "cuda" else (lambda: None)
    (t_ref, ref), (t_full, full), (t_fast, fast) = timed_many(
        [lambda: run(True, reference=True), lambda: run(False), lambda: run(True)], reps, sync)
    identical, score_diff = compare_detections(full.results, fast.results)
    row = {"section": "eval", "case": label, "baseline": "reference", "new": "fast (pruned)",
           "baseline_s": t_ref / images, "full_s": t_full / images, "new_s": t_fast / images,
           "speedup": t_ref / t_fast, "prune_overhead": t_fast / t_full - 1.0,
           "scored_fraction": fast.outputs["scored_queries"].float().mean().item(),
           "reference_scored_fraction": ref.outputs["scored_queries"].float().mean().item(),
           "identical": identical, "max_score_rel_diff": score_diff,
           "vs_reference": compare_with_reference(ref.results, fast.results, sizes.cpu()), "unit": "s/image"}
    if breakdown:
        stages = {}
        for name, fn in (("reference", lambda: run(True, reference=True)), ("fast", lambda: run(True))):
            with stage_timer(model, post, sync) as times:
                start = time.perf_counter()
                fn()
                sync()
                total = time.perf_counter() - start
            stages[name] = stage_seconds(times, total, images)
            stages[name]["total"] = total / images
            stages[name]["region_flops"] = region_head_flops(fn) / images
            stages[name]["region_gflops_per_s"] = stages[name]["region_flops"] / stages[name]["region_head"] / 1e9
        row["breakdown"] = stages
    return row


def golden_eval_rows(folder: Path, reps: int, device, breakdown: bool = False) -> list[dict]:
    model, inputs = golden_model(folder)
    samples = NestedTensor(inputs["batch"], inputs["mask"])
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    rows = [bench_eval_model("golden miniature (2 photos, Q=300)", model, samples, inputs["eval_categories"],
                             sizes, reps, device, breakdown)]
    trained_like(model, len(inputs["eval_categories"]))
    rows.append(bench_eval_model("golden miniature, trained-like scores", model, samples, inputs["eval_categories"],
                                 sizes, reps, device, breakdown))
    return rows


def parse_plans(text: str) -> list[tuple[str, tuple[int, int]]]:
    """'R50:800x1202,R50x4:800x800' -> [('R50', (800, 1202)), ('R50x4', (800, 800))]."""
    plans = []
    for item in filter(None, text.split(",")):
        name, size = item.split(":")
        h, w = size.lower().split("x")
        if name not in CONFIGS:
            raise SystemExit(f"--eval_plans: unknown model {name!r} (one of {sorted(CONFIGS)})")
        plans.append((name, (int(h), int(w))))
    return plans


def section_eval(quick: bool, reps: int, device, *, plans: list | None = None, big_reps: int | None = None,
                 variants: tuple[str, ...] = ("random weights", "trained-like scores"), breakdown: bool = False,
                 small: bool = True) -> list[dict]:
    rows = []
    if small:
        folder = golden_dir()
        if folder is None:
            print("  eval: no golden folder ($CORA_GOLDEN_DIR or ../shared/golden): the golden miniature rows are "
                  "left out")
        else:
            rows += golden_eval_rows(folder, reps, device, breakdown)
        model, samples, toy_categories, sizes = toy_case()
        label = f"toy world model ({sizes.shape[0]} scenes, Q={model.query_embed.weight.shape[0]})"
        rows.append(bench_eval_model(label, model, samples, toy_categories, sizes, reps, device, breakdown))
    categories = list(COCO_OVD_CATEGORIES)
    if plans is None:
        plans = [("R50", (480, 640))] if quick else [("R50", (480, 640)), ("R50", (800, 1216)), ("R50x4", (480, 640)),
                                                      ("R50x4", (800, 1216))]
    for name, (h, w) in plans:
        for variant in variants:
            model, args = random_model(name)
            if variant != "random weights":
                trained_like(model, len(categories))
            gen = torch.Generator().manual_seed(1)
            image = torch.randn(1, 3, h, w, generator=gen)
            samples = NestedTensor(image, torch.zeros(1, h, w, dtype=torch.bool))
            label = f"{name} {h}x{w} Q={args.num_queries}, {variant}"
            print(f"  eval: {label} ...", flush=True)
            n = big_reps if big_reps is not None else (1 if quick else max(1, reps // 3))
            rows.append(bench_eval_model(label, model, samples, categories, torch.tensor([[h, w]]), n, device,
                                         breakdown))
            print(f"    {json.dumps(rows[-1])}", flush=True)
    return rows


# --------------------------------------------------------------------------- reduced precision (Predictor only)


def toy_world_eval(predictor, root: Path) -> tuple[float, dict]:
    """Seconds per image and novel / base / all AP50 of `predictor` on the toy world at `root`."""
    from datasets import build_dataset, get_coco_api_from_dataset
    from datasets.ovd_eval import CocoOVDEvaluator
    from main import get_args_parser
    from tools.toy.world import CLASS_NAMES

    val = build_dataset("val", get_args_parser().parse_args(["--coco_path", str(root), "--ovd"]))
    files = [val.img_folder / val.coco.imgs[i]["file_name"] for i in val.ids]
    evaluator = CocoOVDEvaluator(get_coco_api_from_dataset(val), val.label2catid, verbose=False)
    start = time.perf_counter()
    detections = predictor.predict(files, list(CLASS_NAMES), batch_size=4)
    seconds = (time.perf_counter() - start) / len(files)
    for image_id, found in zip(val.ids, detections, strict=True):
        evaluator.update({image_id: {"boxes": found.boxes, "labels": found.labels, "scores": found.scores}})
    evaluator.accumulate()
    stats = evaluator.summarize()  # [12], [13]: base / novel AP50 in percent; [1]: AP50 of all, a fraction
    return seconds, {"novel_ap50": stats[13], "base_ap50": stats[12], "all_ap50": 100 * stats[1]}


def section_precision(quick: bool, reps: int, device) -> list[dict]:
    """The Predictor's opt-in bf16 against fp32: AP50 and time on the toy world the bundled model never saw
    (seed 1, 200 scenes), and detection time of random-weight RN50 at 480x640 (the Predictor's autocast)."""
    import tempfile

    import demo_inputs
    from models.predictor import Predictor, check_precision
    from tools.toy.make_dataset import make_dataset

    try:
        check_precision("bf16", device)
    except ValueError as err:
        print(f"  precision: left out ({err})")
        return []
    rows = []
    kwargs = dict(clip_archive=demo_inputs.TOY_CLIP, region_prompt=demo_inputs.TOY_PROMPT, device=device,
                  disk_cache=False)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(out=tmp, seed=1, train=0, val=200, captions=0, test_per_class=0, workers=1)
        measured = {}
        for precision in ("fp32", "bf16"):
            predictor = Predictor.from_checkpoint(demo_inputs.TOY_CHECKPOINT, precision=precision, **kwargs)
            toy_world_eval(predictor, Path(tmp))  # warm-up: text embeddings, folded trunk
            measured[precision] = toy_world_eval(predictor, Path(tmp))
    (t32, s32), (t16, s16) = measured["fp32"], measured["bf16"]
    ap = {f"{p}_{k}": stats[k] for p, stats in (("fp32", s32), ("bf16", s16))
          for k in ("novel_ap50", "base_ap50", "all_ap50")}
    rows.append({"section": "precision", "case": "toy world (seed 1, 200 scenes), Predictor", "baseline": "fp32",
                 "new": "bf16", "baseline_s": t32, "new_s": t16, "speedup": t32 / t16, "unit": "s/image", **ap})
    model, _ = random_model("R50")
    model.eval().to(device)
    h, w = 480, 640
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    samples = NestedTensor(image, torch.zeros(1, h, w, dtype=torch.bool)).to(device)
    sizes = torch.tensor([[h, w]], device=device)
    categories = list(COCO_OVD_CATEGORIES)

    def run(bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return detect(model, samples, categories, postprocess=PostProcess(), target_sizes=sizes)

    sync = cuda_sync if device.type == "cuda" else (lambda: None)
    (t32, _), (t16, _) = timed_many([lambda: run(False), lambda: run(True)], 1 if quick else max(1, reps // 3), sync)
    rows.append({"section": "precision", "case": f"R50 {h}x{w}, random weights, detect", "baseline": "fp32",
                 "new": "bf16 autocast", "baseline_s": t32, "new_s": t16, "speedup": t32 / t16, "unit": "s/image"})
    return rows


# --------------------------------------------------------------------------- the floor


def section_peak(reps: int, device) -> list[dict]:
    """This machine's float32 matmul and convolution throughput (best of `reps`): the floor of the region head."""
    sync = cuda_sync if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    n = 4096
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    x = torch.randn(32, 512, 28, 28, generator=gen).to(device)
    weight = torch.randn(512, 512, 3, 3, generator=gen).to(device) * 0.01
    conv_flops = 2.0 * 32 * 512 * 512 * 9 * 28 * 28
    cases = [("matmul 4096x4096x4096", lambda: a @ b, 2.0 * n ** 3),
             ("conv 3x3 512->512, 32x28x28, channels-last",
              lambda: torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), weight, padding=1),
              conv_flops),
             ("conv 3x3 512->512, 32x28x28, NCHW", lambda: torch.nn.functional.conv2d(x, weight, padding=1),
              conv_flops)]
    rows = []
    for label, fn, flops in cases:
        fn()
        sync()
        best = float("inf")
        for _ in range(max(reps, 3)):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        rows.append({"section": "peak", "case": label, "baseline": "-", "new": "fp32", "new_s": best,
                     "gflops_per_s": flops / best / 1e9, "unit": "s/call"})
        print(f"  peak: {label}: {flops / best / 1e9:.0f} GFLOP/s", flush=True)
    return rows


def section_chunk(reps: int, device, sizes: tuple[int, ...] = (8, 16, 32, 64, 128)) -> list[dict]:
    """The fast region head's seconds per box against its chunk size, on 256 boxes of one image."""
    from models.region_head import RegionHead

    rows = []
    for name, (h, w) in (("R50", (800, 1202)), ("R50x4", (800, 800))):
        model, _ = random_model(name)
        model.eval().to(device)
        gen = torch.Generator().manual_seed(1)
        image = torch.randn(1, 3, h, w, generator=gen).to(device)
        layer3 = model.backbone(NestedTensor(image, torch.zeros(1, h, w, dtype=torch.bool, device=device)))[0]["layer3"]
        boxes = torch.cat([torch.rand(256, 2, generator=gen) * 0.8 + 0.1,
                           torch.rand(256, 2, generator=gen) * 0.5 + 0.02], dim=1).to(device)
        trunk = model.backbone.trunk
        sync = cuda_sync if device.type == "cuda" else (lambda: None)

        def embed(size: int, trunk=trunk, layer3=layer3, boxes=boxes):
            with torch.no_grad():
                return RegionHead(trunk, layer3, chunk_size=size).embed(0, boxes, expected=1000)

        measured = timed_many([functools.partial(embed, size) for size in sizes], reps, sync)
        for size, (t, _) in zip(sizes, measured, strict=True):
            rows.append({"section": "chunk", "case": f"{name} {h}x{w}, 256 boxes", "baseline": "-",
                         "new": f"chunk {size}", "new_s": t / 256, "unit": "s/box"})
            print(f"  chunk: {name} chunk {size}: {1000 * t / 256:.1f} ms/box", flush=True)
    return rows


# --------------------------------------------------------------------------- train step


def train_step_fn(model, criterion, optimizer, samples, categories, targets) -> Callable[[], float]:
    """One iteration as engine.train_one_epoch runs it (no class split), returning the weighted loss."""

    def step() -> float:
        outputs = model(samples, categories=categories)
        losses = criterion(outputs, class_agnostic_targets(targets))
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return loss.item()

    return step


def section_train(quick: bool, reps: int, device) -> list[dict]:
    from util.optim import build_optimizer

    rows = []
    folder = golden_dir()
    cases = ([("golden miniature, batch 2", None)] if folder is not None else []) + (
        [] if quick else [("R50 480x640 Q=1000, batch 2", "R50")])
    for label, name in cases:
        if name is None:
            args = golden_args(folder, dropout=0.0)
            model, criterion, _ = __import__("models").build_model(args)
            inputs = golden_load(folder, "inputs.pth")
            samples = NestedTensor(inputs["batch"], inputs["mask"])
            categories = inputs["train_categories"]
            targets = [{"boxes": t["boxes"], "labels": t["labels_train"]} for t in inputs["targets"]]
        else:
            model, args = random_model(name)
            from models.criterion import build_criterion
            from models.matcher import build_matcher

            cfg = ModelConfig.from_args(args)
            criterion = build_criterion(cfg, build_matcher(cfg))
            samples = NestedTensor(torch.randn(2, 3, 480, 640), torch.zeros(2, 480, 640, dtype=torch.bool))
            categories = [n for _, n, kind in COCO_OVD_TABLE if kind == "B"]
            targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]),
                        "labels": torch.tensor([0, 5])} for _ in range(2)]
        model.to(device).train()
        optimizer, _ = build_optimizer(model, lr=1e-4, weight_decay=1e-4, lr_drop=40)
        samples = samples.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

        step = train_step_fn(model, criterion, optimizer, samples, categories, targets)
        sync = cuda_sync if device.type == "cuda" else (lambda: None)
        t, _ = timed(step, reps if name is None else max(1, reps // 3), sync)
        rows.append({"section": "train", "case": label, "baseline": "-", "new": "train step", "new_s": t,
                     "unit": "s/iteration"})
    return rows


# --------------------------------------------------------------------------- matching


def matching_inputs(batch: int, boxes: int, layers: int = 6, queries: int = 1000, classes: int = 48, seed: int = 0):
    """Decoder-like outputs of every layer and class-agnostic targets whose classes occur among the
    queries' pre-matched classes (so that most GT boxes stay matchable, as in training)."""
    gen = torch.Generator().manual_seed(seed)
    proposal = torch.randint(0, classes, (batch, queries), generator=gen)
    layer_outputs = []
    for _ in range(layers):
        cxcy = torch.rand(batch, queries, 2, generator=gen) * 0.8 + 0.1
        wh = torch.rand(batch, queries, 2, generator=gen) * 0.3 + 0.05
        layer_outputs.append({"pred_logits": torch.randn(batch, queries, 1, generator=gen),
                              "pred_boxes": torch.cat([cxcy, wh], -1), "proposal_classes": proposal})
    targets = []
    for b in range(batch):
        cxcy = torch.rand(boxes, 2, generator=gen) * 0.8 + 0.1
        wh = torch.rand(boxes, 2, generator=gen) * 0.3 + 0.05
        labels = proposal[b, torch.randint(0, queries, (boxes,), generator=gen)]
        targets.append({"boxes": torch.cat([cxcy, wh], -1), "labels": labels})
    return layer_outputs, class_agnostic_targets(targets)


def match_per_layer(matcher: HungarianMatcher, layer_outputs: list[dict], targets: list[dict]) -> list:
    """What SetCriterion does today: one matcher call per decoder layer."""
    return [matcher(o, targets) for o in layer_outputs]


def match_all_layers(matcher: HungarianMatcher, layer_outputs: list[dict], targets: list[dict]) -> list:
    """What a layer-batched criterion would do: every layer's cost matrices, one torch solve, then the
    matcher's removal of masked matches."""
    costs = [c for o in layer_outputs for c in matcher.cost_matrices(o, targets)]
    out = []
    for c, (r, k) in zip(costs, torch_assignment(costs), strict=True):
        keep = (c[r.to(c.device), k.to(c.device)] < MASKED_COST).cpu()
        out.append((r[keep], k[keep]))
    n = len(targets)
    return [out[i * n:(i + 1) * n] for i in range(len(layer_outputs))]


def section_match(quick: bool, reps: int, devices) -> list[dict]:
    rows = []
    matchers = {name: HungarianMatcher(solver=solver) for name, solver in
                (("scipy", scipy_assignment), ("torch", torch_assignment))}
    for device in devices:
        sync = cuda_sync if device.type == "cuda" else (lambda: None)
        for batch in (1, 4, 8):
            for boxes in (5, 20, 50):
                layer_outputs, targets = matching_inputs(batch, boxes)
                layer_outputs = [{k: v.to(device) for k, v in o.items()} for o in layer_outputs]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

                runs = {name: functools.partial(fn, matchers[solver], layer_outputs, targets) for name, fn, solver in
                        (("scipy", match_per_layer, "scipy"), ("torch", match_per_layer, "torch"),
                         ("all", match_all_layers, "torch"))}
                (t_scipy, m_scipy), (t_torch, m_torch), (t_all, m_all) = timed_many(
                    [runs["scipy"], runs["torch"], runs["all"]], reps, sync)
                same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
                           and torch.equal(a[1], c[1])
                           for la, lb, lc in zip(m_scipy, m_torch, m_all, strict=True)
                           for a, b, c in zip(la, lb, lc, strict=True))
                case = f"{device.type} B={batch} T={boxes} (6 layers, Q=1000)"
                rows.append({"section": "match", "case": case, "baseline": "scipy loop", "new": "torch per layer",
                             "baseline_s": t_scipy, "new_s": t_torch, "speedup": t_scipy / t_torch, "identical": same,
                             "unit": "s/iteration"})
                rows.append({"section": "match", "case": case, "baseline": "scipy loop", "new": "torch all layers",
                             "baseline_s": t_scipy, "new_s": t_all, "speedup": t_scipy / t_all, "identical": same,
                             "unit": "s/iteration"})
    return rows


# --------------------------------------------------------------------------- OVD evaluation


def synthetic_ovd(images: int = 500, seed: int = 0) -> tuple[dict, list[int], dict]:
    """A COCO-OVD ground truth of `images` images (65 classes, 0–15 boxes, 2 % crowd) and PostProcess-
    style detections (100 per image: jittered GT boxes with their or another label, and random boxes)."""
    rng = np.random.default_rng(seed)
    catids = sorted(BASE_CATIDS + NOVEL_CATIDS)
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in catids]}
    detections = {}
    ann_id = 1
    for image_id in range(1, images + 1):
        w, h = int(rng.integers(320, 640)), int(rng.integers(240, 480))
        data["images"].append({"id": image_id, "width": w, "height": h})
        gts = []
        for _ in range(int(rng.integers(0, 16))):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            label = int(rng.integers(0, len(catids)))
            data["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": catids[label],
                                        "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(rng.random() < 0.02)})
            ann_id += 1
            gts.append((label, x, y, bw, bh))
        boxes, labels = [], []
        for _ in range(100):
            if gts and rng.random() < 0.6:
                label, x, y, bw, bh = gts[int(rng.integers(0, len(gts)))]
                jitter = rng.normal(0, 0.1, 4) * [bw, bh, bw, bh]
                x0, y0, x1, y1 = x + jitter[0], y + jitter[1], x + bw + jitter[2], y + bh + jitter[3]
                label = label if rng.random() < 0.7 else int(rng.integers(0, len(catids)))
            else:
                x0, y0 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
                x1, y1 = x0 + rng.uniform(5, w / 2), y0 + rng.uniform(5, h / 2)
                label = int(rng.integers(0, len(catids)))
            boxes.append([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)])
            labels.append(label)
        scores = np.sort(rng.random(100))[::-1].copy()
        detections[image_id] = {"scores": torch.tensor(scores, dtype=torch.float32),
                                "labels": torch.tensor(labels, dtype=torch.int64),
                                "boxes": torch.tensor(boxes, dtype=torch.float32)}
    return data, catids, detections


def section_ovd(quick: bool, reps: int) -> list[dict]:
    data, catids, detections = synthetic_ovd(500)

    def run(backend):
        evaluator = CocoOVDEvaluator(data, catids, backend=backend, verbose=False)
        evaluator.update(detections)
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        return evaluator.summarize()

    backends = ("pycocotools", "faster-coco-eval")
    measured = timed_many([functools.partial(run, b) for b in backends], reps)
    times = {b: t for b, (t, _) in zip(backends, measured, strict=True)}
    stats = {b: r for b, (_, r) in zip(backends, measured, strict=True)}
    diff = max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["faster-coco-eval"], strict=True)
               if not (np.isnan(a) and np.isnan(b)))
    return [{"section": "ovd", "case": "500 images, 65 classes, 100 dets/image", "baseline": "pycocotools",
             "new": "faster-coco-eval", "baseline_s": times["pycocotools"], "new_s": times["faster-coco-eval"],
             "speedup": times["pycocotools"] / times["faster-coco-eval"], "identical": diff <= 1e-6,
             "max_stat_diff": diff, "unit": "s/evaluation"}]


# --------------------------------------------------------------------------- main


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


AP_KEYS = ("novel_ap50", "base_ap50", "all_ap50")


def format_table(rows: list[dict]) -> str:
    header = ["section", "case", "baseline", "new", "baseline", "new", "speedup", "identical", "note"]
    lines = [header]
    def fmt(r: dict, key: str) -> str:
        return f"{r[key]:.4g}" if key in r and isinstance(r[key], float) else "-"

    for r in rows:
        note = f"{r['unit']}"
        if "bf16_novel_ap50" in r:
            note += ", AP50 novel / base / all: fp32 " + " / ".join(f"{r['fp32_' + k]:.1f}" for k in AP_KEYS) \
                + ", bf16 " + " / ".join(f"{r['bf16_' + k]:.1f}" for k in AP_KEYS)
        if "gflops_per_s" in r:
            note += f", {r['gflops_per_s']:.0f} GFLOP/s"
        if "scored_fraction" in r:
            vs = r["vs_reference"]
            note += (f", fast full {r['full_s']:.4g} (pruning {100 * r['prune_overhead']:+.1f}%), scored "
                     f"{100 * r['scored_fraction']:.0f}% (reference {100 * r['reference_scored_fraction']:.0f}%), "
                     f"full = pruned: {r['identical']}; vs reference: same detections {vs['same_detections']} "
                     f"(order {vs['same_order']}), "
                     f"score {vs['score_rel_diff']:.1e} rel, box {vs['box_diff_of_side']:.1e} of side")
        identical = str(r.get("identical", "-"))
        lines.append([r["section"], r["case"], r["baseline"], r["new"], fmt(r, "baseline_s"), fmt(r, "new_s"),
                      f"{r['speedup']:.2f}x" if "speedup" in r else "-", identical, note])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_breakdown(rows: list[dict]) -> str:
    """Seconds per image per stage (reference / fast) and the region head's GFLOP/s, next to the peak."""
    peak = max((r["gflops_per_s"] for r in rows if r["section"] == "peak"), default=None)
    stages = ["backbone", "text", "prematch", "transformer", "region_head", "stop_checks", "postprocess", "other",
              "total"]
    lines = ["| case | path | " + " | ".join(stages) + " | region GFLOP | region GFLOP/s |"
             + (" of peak |" if peak else ""), "|" + "---|" * (len(stages) + 4 + (1 if peak else 0))]
    for r in rows:
        for path, b in r.get("breakdown", {}).items():
            cells = [f"{b[k]:.3g}" for k in stages]
            tail = f" {b['region_flops'] / 1e9:.0f} | {b['region_gflops_per_s']:.0f} |"
            if peak:
                tail += f" {100 * b['region_gflops_per_s'] / peak:.0f}% |"
            lines.append(f"| {r['case']} | {path} | " + " | ".join(cells) + " |" + tail)
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="golden miniature + RN50 at 480x640 only, fewer repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 5, quick 3)")
    p.add_argument("--sections", default="peak,eval,train,match,ovd",
                   help="any of peak,eval,chunk,precision,train,match,ovd")
    p.add_argument("--eval_plans", default="",
                   help="eval: random-weight models and sizes, e.g. R50:800x1202,R50x4:800x800 (default by --quick)")
    p.add_argument("--big_reps", type=int, default=None, help="eval: repetitions of the random-weight models")
    p.add_argument("--variants", default="random,trained", help="eval: random and/or trained(-like scores)")
    p.add_argument("--no_small", action="store_true", help="eval: leave out the golden miniature and the toy model")
    p.add_argument("--breakdown", action="store_true",
                   help="eval: where the time goes, per stage, and the region head's GFLOP/s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the eval and train sections (matching runs on the CPU and CUDA if present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmark.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    device = torch.device(args.device)
    sections = args.sections.split(",")
    rows: list[dict] = []
    info = machine()
    print(f"machine: {info}", flush=True)
    match_devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in sections:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        if name == "peak":
            rows += section_peak(reps, device)
        elif name == "eval":
            variants = tuple({"random": "random weights", "trained": "trained-like scores"}[v]
                             for v in args.variants.split(","))
            rows += section_eval(args.quick, reps, device, plans=parse_plans(args.eval_plans) or None,
                                 big_reps=args.big_reps, variants=variants, breakdown=args.breakdown,
                                 small=not args.no_small)
        elif name == "chunk":
            rows += section_chunk(reps, device)
        elif name == "precision":
            rows += section_precision(args.quick, reps, device)
        elif name == "train":
            rows += section_train(args.quick, reps, device)
        elif name == "match":
            rows += section_match(args.quick, reps, match_devices)
        elif name == "ovd":
            rows += section_ovd(args.quick, reps)
        else:
            raise SystemExit(f"unknown section {name!r}")
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    table = format_table(rows)
    print(table)
    breakdown = format_breakdown(rows)
    if breakdown:
        print(breakdown)
        table += "\n\n" + breakdown
    result = {"machine": info, "quick": args.quick, "reps": reps, "rows": rows, "table": table}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
