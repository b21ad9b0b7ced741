"""Exact pruned region scoring at evaluation: CLIP-score only the queries that can change the detections.

The full eval path (`CORA.forward`, `prune_eval=None`) runs CLIP's layer4 and attention pool on all
Q final boxes of every image, although PostProcess keeps at most K = 100 (LVIS 300) detections.
A detection's score is `class_prob × sigmoid(objectness)` with `class_prob ≤ 1`, so a query's
objectness alone bounds every score it can produce. Here each image's queries are scored in chunks
of descending bound, and scoring stops as soon as the detections PostProcess returns can no longer
change. Unscored queries get the logit `FILL_LOGIT = inverse_sigmoid(0)` (the floor of the full
path's logits, score ≈ 1e-5 < `SCORE_THRESHOLD`), so PostProcess never reads them; the boolean
`scored_queries [B,Q]` says which queries hold their real scores.

Why stopping is exact (NMS mode: score > 0.001, class-wise greedy NMS at IoU 0.5, first K).
Let S_full be the candidate (query, class) pairs of the full path, S_p ⊆ S_full those of the
scored queries (the same scores: the same functions on the same boxes), and β an upper bound on
every score an unscored query can produce, as PostProcess reads it (below: roundtrip + slack).

1. Greedy NMS visits candidates in descending score and keeps one iff no *kept* candidate visited
   before it (same class) overlaps it with IoU > 0.5. So the keep decision of a candidate depends
   only on the candidates with a higher score: an unscored candidate (score ≤ β) can never suppress
   one with score > β, and a candidate it would have suppressed has a lower score still. By
   induction over the visiting order, every candidate with score > β is kept in the full run iff it
   is kept in the pruned run — provided both runs decide each pair (overlap or not) identically.
2. The returned detections are the kept candidates in descending score, cut at K. If the pruned run
   keeps at least K candidates and the K-th has score > β (strictly), then the first K kept of both
   runs are the same candidates, in the same order, with the same scores.
3. Pairwise decisions. torchvision's `batched_nms` computes IoUs in one of two ways, depending on the
   number N of candidates (CPU: N > 1000, CUDA: N > 25000 → one `nms` per class on the raw boxes;
   otherwise one `nms` on boxes shifted by `class × (max coordinate + 1)`). The shift rounds the
   coordinates, so IoUs near 0.5 may round differently when the variant or the maximum coordinate
   differs. Stopping therefore also requires one of: (a) the pruned run already has N_p above the
   threshold (then N_full ≥ N_p is too: both per class, raw boxes); (b) N_full is certainly at or
   below the threshold — N_p plus, per unscored query, at most ⌊β_q / 0.001⌋ classes (the class
   probabilities sum to ≤ 1) — and no unscored query that can still be a candidate has a box
   coordinate above the pruned run's maximum (then both runs shift by the same offsets); (c) every
   same-class pair of candidates with score > β has an IoU whose rounding interval under either
   variant (any shift up to C·(max|coordinate| + 1)) lies entirely on one side of 0.5
   (`nms_decisions_certain`): then both runs take the exact-arithmetic decision for every pair that
   matters.
4. Otherwise scoring continues; once no unscored query can reach the 0.001 threshold the candidate
   sets are equal and the result is the full one trivially (this also covers images with fewer than
   K detections).

Without NMS (top K of all Q×C scores) stopping needs the K-th score > β and > the fill's score.
(There `topk` would also rank NaN scores first; a query whose class scores are NaN but whose
objectness is finite cannot be bounded, so that mode assumes finite region scores. With NMS such
queries are never candidates, in either run.)

The bound. PostProcess reads `sigmoid(inverse_sigmoid(p × σ(o)))` with p ≤ 1 (softmax), so its score
is at most `sigmoid(inverse_sigmoid(σ(o)))` up to float rounding (a few ulps); β multiplies that by
(1 + 1e-4). NaN objectness gives β = ∞ (scored before stopping; such queries are then non-finite
and dropped, as in the full path).

Ties: the visiting order of equal scores is a sort's tie order. torchvision's CPU `nms` sorts stably
and both runs list their candidates in the same (query, class) order, but the per-class variant's
final `sort` (and `topk` without NMS) is not stable, so detections whose scores are *bit-identical*
may come out in another order (or, at the K-th place, be exchanged for each other).

Bit-identical scores: a batched convolution or matrix product can round a row differently when the
batch size changes (the libraries pick kernels by shape; RN50's attention pool does, by ~3e-7, which
softmax(100·cos) turns into ~4e-6 relative on a score). So the full path (`prune=False`,
`--no_prune_eval`) is not one pass over all Q boxes: it scores the same per-image chunks as the pruned
path, then the rest, and every scored query's logit is bit-identical in both modes.

The schedule. Each image's potential queries are scored in rounds of descending bound; how many per
round depends only on that image's objectness and the device, never on the scores. (i) Up front,
`first_stop_position` finds the fewest scored queries p* at which stopping is possible at all: with p
queries scored, at most `min(C, floor(β_i / β))` classes of query i can score above β (its class
probabilities sum to ≤ 1), and stopping needs K kept detections above the next bound β; this count
grows with p, so the first round scores at least p* queries. (ii) Before running PostProcess, a check
asks for at least K candidate scores above β (necessary for the same reason), so a round that cannot
stop costs a comparison, not an NMS. (iii) On a CPU the rounds grow slowly (50 × 1.25ⁿ: one box
through layer4 costs far more than a check); on CUDA they start at 256 and double (each check waits
for the device: a few large rounds). All three only decide *when* to check, so the argument above is
unchanged. `models.backbone.reference_eval()` restores the earlier schedule (50 × 1.25ⁿ everywhere, a
PostProcess at every check) for benchmarks.

Logged evaluation losses: engine.evaluate's logging criterion reads `pred_logits` of every query, so
under pruning its `loss_ce`/`class_error` (and matches) see the fill logits of unscored queries: the
logged eval losses are not the full path's, the evaluation statistics are. `--no_prune_eval` gives
the full path's logits everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.backbone import Backbone, fast_eval_enabled
from models.postprocess import SCORE_THRESHOLD, PostProcess, nms_uses_per_class_variant
from models.region_head import RegionHead, detection_logits, region_embeddings, uses_fast_path
from util.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from util.nested_tensor import NestedTensor

# Relative slack on the score bound: covers the few-ulp rounding of sigmoid/log/division and of the
# softmax normalisation (≤ C × 2^-24 relative for C ≤ 1203 LVIS classes).
BOUND_SLACK = 1e-4
COUNT_SLACK = 1e-3
FILL_LOGIT = math.log(1e-5)  # = inverse_sigmoid(0, eps=1e-5): the lowest logit the full path produces


# Rounds per device type (module doc, "The schedule"): (first chunk, growth).
SCHEDULES = {"cpu": (50, 1.25), "cuda": (256, 2.0)}
REFERENCE_SCHEDULE = (50, 1.25)  # every device, before issue 19


@dataclass(frozen=True)
class PruneSpec:
    """What the pruned path must reproduce (PostProcess's settings) and its chunk schedule.

    max_detections / use_nms: those of the PostProcess that reads the outputs. first_chunk: queries
    scored per image in the first round; each later round scores `growth` times more. None: the
    device's schedule (`SCHEDULES`: on a CPU 50 × 1.25ⁿ, 9 rounds to 1000 queries; on CUDA 256 × 2ⁿ).
    plan: start with at least `first_stop_position` queries (the fewest at which stopping is possible).
    """

    max_detections: int = 100
    use_nms: bool = True
    first_chunk: int | None = None
    growth: float | None = None
    prune: bool = True  # False: score every query (`--no_prune_eval`), in the same chunks
    plan: bool = True

    @classmethod
    def for_postprocess(cls, post: PostProcess, **kwargs) -> PruneSpec:
        return cls(max_detections=post.max_detections, use_nms=post.use_nms, **kwargs)

    def schedule(self, device: torch.device) -> tuple[int, float]:
        """(first chunk, growth) on `device`."""
        first, growth = SCHEDULES.get(device.type, SCHEDULES["cuda"]) if fast_eval_enabled() else REFERENCE_SCHEDULE
        return (first if self.first_chunk is None else self.first_chunk,
                growth if self.growth is None else self.growth)


def score_bound(objectness: torch.Tensor) -> torch.Tensor:
    """Upper bound β (with slack) of every score PostProcess can read for a query: `[...] -> [...]`."""
    bound = inverse_sigmoid(objectness.sigmoid(), eps=1e-5).sigmoid() * (1 + BOUND_SLACK)
    return torch.where(torch.isnan(bound), torch.full_like(bound, float("inf")), bound)


def _can_stop(logits: torch.Tensor, boxes_xyxy: torch.Tensor, boxes: torch.Tensor, scored: torch.Tensor,
              bound: torch.Tensor, potential: torch.Tensor, spec: PruneSpec, post: PostProcess) -> str | None:
    """Why PostProcess on this image's current logits returns what it would on the full path, or None
    if that is not certain yet: 'complete' (every query that can matter is scored), 'top_k' (no NMS),
    'per_class' / 'same_shift' / 'certain_iou' (NMS: cases (a) / (b) / (c) of the module doc).

    logits `[Q,C]` (real for scored queries, FILL_LOGIT elsewhere), boxes `[Q,4]` cxcywh and their xyxy,
    scored / potential `[Q]` bool (potential: unscored queries that could still produce a detection),
    bound `[Q]` (see `score_bound`).
    """
    remaining = potential & ~scored
    if not bool(remaining.any()):
        return "complete"  # every query that can matter is scored: the same candidates as the full path
    beta = bound[remaining].max()
    if fast_eval_enabled() and int((logits.sigmoid() > beta).sum()) < spec.max_detections:
        return None  # fewer than K scores above β: K kept detections above it are impossible
    kept = post({"pred_logits": logits[None], "pred_boxes": boxes[None]},
                torch.ones(1, 2, dtype=boxes.dtype, device=boxes.device))[0]["scores"]
    if kept.numel() < spec.max_detections or not bool(kept[-1] > beta):
        return None
    if not spec.use_nms:
        return "top_k" if bool(kept[-1] > torch.sigmoid(torch.tensor(FILL_LOGIT, dtype=kept.dtype))) else None
    # the same candidate test as PostProcess, for the count and the maximum coordinate
    prob = logits.sigmoid()
    finite = torch.isfinite(boxes_xyxy).all(dim=1) & torch.isfinite(prob).all(dim=1)
    query, label = torch.nonzero((prob > SCORE_THRESHOLD) & finite[:, None], as_tuple=True)
    num_pruned = query.numel()
    if nms_uses_per_class_variant(num_pruned, boxes.device):
        return "per_class"  # (a): both runs per class on raw boxes
    per_query = torch.floor(bound[remaining].double() * (1 + COUNT_SLACK) / SCORE_THRESHOLD)
    upper = num_pruned + int(per_query.clamp(max=logits.shape[1]).sum().item())
    if not nms_uses_per_class_variant(upper, boxes.device):
        # (b): both runs shift by class × (max + 1); the same max gives the same IoUs
        if bool(boxes_xyxy[remaining].float().max() <= boxes_xyxy[query].float().max()):
            return "same_shift"
    # (c): the decisions that matter are certain under either variant's rounding
    above = prob[query, label] > beta
    if nms_decisions_certain(boxes_xyxy[query[above]], label[above], boxes_xyxy[finite], logits.shape[1]):
        return "certain_iou"
    return None


def nms_decisions_certain(boxes: torch.Tensor, labels: torch.Tensor, all_boxes: torch.Tensor,
                          num_classes: int) -> bool:
    """Whether every same-class pair of `boxes` (xyxy `[n,4]`, `labels [n]`) is on the same side of
    IoU 0.5 however `batched_nms` rounds: raw coordinates, or shifted by `class × (max + 1)` with the
    max taken over any subset of `all_boxes` (`[m,4]`, every finite box of the image).

    A shifted coordinate x + s is off by at most u·|x + s| (u = 2⁻²⁴) and |x + s| ≤ D =
    C·(A + 1) + A with A = max |coordinate|, so every width and intersection width is within
    ε = 4u(D + 1) of its exact value; products, sums and the division add a relative u each. The
    interval of the computed IoU that follows (in float64) must lie strictly above 0.5 (always
    suppressed) or at or below 0.5 (never). Boxes of different classes never overlap once shifted
    (gap 1 + min coordinate > 0), which is checked too.
    """
    if boxes.shape[0] < 2:
        return True
    all_boxes = all_boxes.double()
    if not bool(all_boxes.min() > -0.99):
        return False
    u = 2.0 ** -24
    big = float(all_boxes.abs().max())
    eps = 4 * u * (num_classes * (big + 1) + big + 1)
    boxes = boxes.double()
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    i, j = same.triu().nonzero(as_tuple=True)
    if i.numel() == 0:
        return True
    a, b = boxes[i], boxes[j]
    w_a, h_a = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    w_b, h_b = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    iw = torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])
    ih = torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])

    def lo(x):
        return (x - eps).clamp(min=0)

    def hi(x):
        return (x + eps).clamp(min=0)

    inter_lo, inter_hi = lo(iw) * lo(ih) * (1 - 2 * u), hi(iw) * hi(ih) * (1 + 2 * u)
    area_a_lo, area_a_hi = lo(w_a) * lo(h_a) * (1 - 2 * u), hi(w_a) * hi(h_a) * (1 + 2 * u)
    area_b_lo, area_b_hi = lo(w_b) * lo(h_b) * (1 - 2 * u), hi(w_b) * hi(h_b) * (1 + 2 * u)
    union_hi = (area_a_hi + area_b_hi - inter_lo) * (1 + 3 * u)
    union_lo = (area_a_lo + area_b_lo - inter_hi) * (1 - 3 * u)
    iou_lo = inter_lo / union_hi * (1 - 2 * u)
    iou_hi = inter_hi / union_lo * (1 + 2 * u)
    # a non-positive lower union bound means a degenerate pair: uncertain
    certain = ((union_lo > 0) & ((iou_lo > 0.5) | (iou_hi <= 0.5))) | ((inter_hi == 0) & (union_lo > 0))
    return bool(certain.all())


def first_stop_position(bounds: torch.Tensor, num_classes: int, max_detections: int) -> int:
    """The fewest queries that must be scored before scoring can stop early (module doc, "The schedule").

    bounds `[P]`: the potential queries' `score_bound`s in scoring order (descending). With p scored,
    stopping needs K = `max_detections` kept detections above β_p = bounds[p]; query i contributes at
    most `min(C, floor(bounds[i] (1 + COUNT_SLACK) / β_p))` scores above β_p. Returns the smallest p with
    a total ≥ K (the total never decreases with p), or P if there is none (stop only when complete).
    """
    total_queries = bounds.shape[0]
    bounds = bounds.double().cpu()  # one copy from the device, then host arithmetic

    def possible(p: int) -> bool:
        beta = bounds[p]
        if not bool(torch.isfinite(beta)) or not bool(beta > 0):
            return False
        per_query = torch.floor(bounds[:p] * (1 + COUNT_SLACK) / beta).clamp(max=num_classes)
        return bool(per_query.sum() >= max_detections)

    lo, hi = 1, total_queries  # the answer lies in [lo, hi]; hi = P means never
    while lo < hi:
        mid = (lo + hi) // 2
        if possible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if total_queries else 0


ScoreFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@torch.no_grad()
def pruned_logits(boxes: torch.Tensor, objectness: torch.Tensor, num_classes: int, score_fn: ScoreFn,
                  spec: PruneSpec, trace: list[tuple[int, int, str | None]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stopping logic on its own: `score_fn(picks)` gets per image the query indices to score
    (`[n_b]` int64, possibly empty) and returns per image their eval logits `[n_b, C]`.

    boxes `[B,Q,4]` cxcywh, objectness `[B,Q,1]` logits. Returns `pred_logits [B,Q,C]` (scored rows
    from `score_fn`, `FILL_LOGIT` elsewhere) and `scored [B,Q]` bool. `trace`, if given, receives
    `(image, queries scored, stop reason or None)` after every check (tests, benchmark).

    The chunks an image's queries are scored in depend only on that image's objectness, never on
    when scoring stops: with `spec.prune = False` the same chunks are scored, then the queries that
    cannot become detections, so a `score_fn` that scores each image's chunk on its own gives
    bit-identical logits in both modes.
    """
    num_images, num_queries = boxes.shape[:2]
    device = boxes.device
    obj = objectness[..., 0]
    bound = score_bound(obj)  # [B,Q]
    boxes_xyxy = box_cxcywh_to_xyxy(boxes)
    if spec.use_nms:
        # only a finite box above the threshold can become a candidate
        potential = torch.isfinite(boxes_xyxy).all(dim=-1) & (bound > SCORE_THRESHOLD)
    else:
        potential = torch.ones_like(bound, dtype=torch.bool)  # any score can enter the top K
    # per image: potential queries by descending bound (stable), then the rest
    key = torch.where(potential, bound, torch.full_like(bound, -float("inf")))
    order = key.argsort(dim=1, descending=True, stable=True)
    num_potential = potential.sum(dim=1).tolist()

    logits = torch.full((num_images, num_queries, num_classes), FILL_LOGIT, dtype=obj.dtype, device=device)
    scored = torch.zeros(num_images, num_queries, dtype=torch.bool, device=device)
    post = PostProcess(max_detections=spec.max_detections, use_nms=spec.use_nms)

    def score_round(ends: list[int]) -> None:
        picks = [order[b, position[b]:end] for b, end in enumerate(ends)]
        for b, (q, values) in enumerate(zip(picks, score_fn(picks), strict=True)):
            if len(q):
                logits[b, q] = values.to(logits.dtype)
                scored[b, q] = True
        position[:] = ends

    done = [n == 0 for n in num_potential]
    position = [0] * num_images
    first, growth = spec.schedule(device)
    # per image: the first round scores at least the queries stopping needs (depends on objectness only)
    chunk = [max(1, first, first_stop_position(bound[b, order[b, :n]], num_classes, spec.max_detections)
                 if spec.plan and fast_eval_enabled() else 1) for b, n in enumerate(num_potential)]
    while not all(done):
        score_round([position[b] if done[b] else min(position[b] + chunk[b], num_potential[b])
                     for b in range(num_images)])
        for b in range(num_images):
            if done[b]:
                continue
            if position[b] >= num_potential[b]:
                reason = "complete"
            elif spec.prune:
                reason = _can_stop(logits[b], boxes_xyxy[b], boxes[b], scored[b], bound[b], potential[b], spec, post)
            else:
                reason = None
            done[b] = reason is not None
            if trace is not None:
                trace.append((b, position[b], reason))
            chunk[b] = max(chunk[b] + 1, int(chunk[b] * growth))
    if not spec.prune and min(position) < num_queries:
        score_round([num_queries] * num_images)  # the non-candidates, so that every logit is real
    return logits, scored


@torch.no_grad()
def pruned_detection_logits(trunk: Backbone, layer3: NestedTensor, boxes: torch.Tensor, text: torch.Tensor,
                            objectness: torch.Tensor, *, tau: float, spec: PruneSpec
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval logits of the queries that can matter, scored in chunks of descending objectness.

    trunk / layer3: as for `region_embeddings` (layer3 `[B,E/2,h,w]` with mask); boxes `[B,Q,4]`
    final cxcywh boxes; text `[C,D]`; objectness `[B,Q,1]` logits. Returns `pred_logits [B,Q,C]`
    (`detection_logits` for scored queries, `FILL_LOGIT` elsewhere) and `scored [B,Q]` bool.
    PostProcess with `spec`'s settings gives on these the detections of the full path (module doc).
    """
    no_boxes = boxes.new_zeros(0, 4)
    num_queries = boxes.shape[1]
    head = RegionHead(trunk, layer3) if uses_fast_path(trunk) else None

    def score(picks: list[torch.Tensor]) -> list[torch.Tensor]:
        # One layer4 + attention-pool pass per image and chunk: a batched convolution or matrix product
        # may round a row differently when the batch size changes (oneDNN, cuDNN and BLAS choose
        # kernels by shape), and the batch would change with the other images' stopping points.
        out = []
        for b, q in enumerate(picks):
            if len(q) == 0:
                out.append(text.new_zeros(0, text.shape[0]))
                continue
            if head is not None:  # `expected`: the same in both modes, so the same numbers
                emb = head.embed(b, boxes[b, q], expected=num_queries)
            else:
                only_b = [boxes[b, q] if i == b else no_boxes for i in range(len(picks))]
                emb = region_embeddings(trunk, layer3, only_b)
            with torch.autocast(emb.device.type, enabled=False):  # cosines and scores always in fp32
                out.append(detection_logits(emb[None].float(), text.float(), objectness[b, q][None].float(),
                                            tau=tau)[0])
        return out

    return pruned_logits(boxes, objectness, text.shape[0], score, spec)
