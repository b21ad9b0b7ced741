"""models/predictor.py on the golden miniature model (../shared/golden) and a 30-query cut of it.

The golden single-image files (`eval_single_*`) are what the original computes for one photo in a
batch of one, from `to_tensor` + normalise of `photos/*.png` without resizing; the predictor with
`resize=False` must reproduce them from the PNG files. Tests that check geometry, image modes and
caching use the same checkpoint cut to 30 queries (an architecture read off the state dict), which
is ten times cheaper to run.
"""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.coco_ovd import COCO_OVD_CATEGORIES, COCO_OVD_NOVEL_INDICES
from datasets.transforms import make_coco_transforms, resize, val_resize_hw
from models.clip import TextClassifier
from models.predictor import Predictor, load_rgb, normalize_vocabulary
from models.prematch import NovelBoost
from tests import golden
from tests.helpers import cut_queries, golden_checkpoint_copy
from util.checkpoint import save_checkpoint
from util.device import resolve_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COFFEE_SAMPLE = os.path.join(ROOT, "assets", "samples", "coffee.png")
PHOTOS = {"astronaut": "photos/astronaut_256x256.png", "coffee": "photos/coffee_224x336.png"}
C65 = list(COCO_OVD_CATEGORIES)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    save_checkpoint(golden_checkpoint_copy(cut_queries), path)
    return path


@pytest.fixture(scope="module")
def golden_factor1(cache_dir):
    return Predictor.from_checkpoint(golden.path("checkpoint_tiny.pth"), resize=False, target_class_factor=1.0,
                                     cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def golden_default(cache_dir):
    return Predictor.from_checkpoint(golden.path("checkpoint_tiny.pth"), resize=False, cache_dir=cache_dir,
                                     device="cpu")


@pytest.fixture(scope="module")
def small(small_checkpoint, cache_dir):
    return Predictor.from_checkpoint(small_checkpoint, cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def small_noresize(small, cache_dir):
    return Predictor(small.model, use_nms=True, target_class_factor=small.target_class_factor, resize=False,
                     cache_dir=cache_dir, device="cpu")


def _assert_matches_golden(dets, ref, *, names=None, clip_to=None):
    """labels identical and in order, scores within 1e-5 + 1e-4 score, boxes within 1e-2 px."""
    if names is None:
        assert torch.equal(dets.labels, ref["labels"]), "labels differ"
    else:
        assert dets.names == [names[i] for i in ref["labels"].tolist()], "class names differ"
    assert ((dets.scores - ref["scores"]).abs() <= 1e-5 + 1e-4 * ref["scores"]).all()
    boxes = ref["boxes"].clone()
    if clip_to is not None:
        h, w = clip_to
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    assert (dets.boxes - boxes).abs().max() <= 1e-2


# ---------------------------------------------------------------- golden: model + post-processing
def test_preprocess_without_resize_is_the_golden_input(golden_factor1):
    inputs = golden.load("inputs.pth")
    for i, name in enumerate(("astronaut", "coffee")):
        tensor, size = golden_factor1.preprocess(golden.path(PHOTOS[name]))
        assert torch.equal(tensor, inputs["images"][i])
        assert size == tuple(inputs["targets"][i]["orig_size"].tolist())


def test_single_images_reproduce_the_original_factor_1(golden_factor1):
    paths = [golden.path(PHOTOS[n]) for n in ("astronaut", "coffee")]
    dets = golden_factor1.predict(paths, C65, clip_boxes=False)
    for d, name in zip(dets, ("astronaut", "coffee"), strict=True):
        ref = golden.load(f"eval_single_{name}_tcf1.pth")
        assert len(d) == 100 and d.extra["target_class_factor"] == 1.0
        assert d.image_size == tuple(ref["orig_size"].tolist()) and d.source == golden.path(PHOTOS[name])
        _assert_matches_golden(d, ref["results"][0])
        assert d.names == [C65[i] for i in d.labels.tolist()]


def test_coco_vocabulary_uses_the_checkpoint_factor_even_after_normalisation(golden_default):
    # Whitespace and duplicates normalise back to the exact 65-name list, which turns the x8 boost on.
    messy = [" person ", "person", "PERSON"] + [f"  {n}" for n in C65]
    assert golden_default.target_class_factor == 8.0
    paths = [golden.path(PHOTOS[n]) for n in ("astronaut", "coffee")]
    dets = golden_default.predict(paths, messy)
    for d, name in zip(dets, ("astronaut", "coffee"), strict=True):
        ref = golden.load(f"eval_single_{name}_tcf8.pth")
        assert d.extra["target_class_factor"] == 8.0 and d.vocabulary == tuple(C65)
        _assert_matches_golden(d, ref["results"][0], clip_to=d.image_size)
        assert (d.boxes[:, 2] <= d.image_size[1]).all() and (d.boxes[:, 3] <= d.image_size[0]).all()


def test_custom_vocabulary_gets_factor_1(golden_default):
    """The 65 names in reverse order are a custom vocabulary: no boost, so the original's factor-1
    detections come back (pre-matching is a softmax over classes: the order does not matter)."""
    tcf1 = golden.load("eval_single_coffee_tcf1.pth")["results"][0]
    tcf8 = golden.load("eval_single_coffee_tcf8.pth")["results"][0]
    # (On the astronaut photo the boost changes nothing; on coffee it re-matches 19 anchors.)
    assert not torch.equal(tcf1["labels"], tcf8["labels"]), "the factor must change these detections"
    reverse = C65[::-1]
    [d] = golden_default.predict(golden.path(PHOTOS["coffee"]), reverse, clip_boxes=False)
    assert d.extra["target_class_factor"] == 1.0
    _assert_matches_golden(d, tcf1, names=C65)
    assert d.names == [reverse[i] for i in d.labels.tolist()]


def test_boost_rules(golden_default):
    assert golden_default.boost_for(tuple(C65)) == NovelBoost(8.0, COCO_OVD_NOVEL_INDICES)
    assert golden_default.boost_for(("cat", "dog")) is None
    assert golden_default.boost_for(tuple(C65[:64])) is None
    assert golden_default.boost_for(("cat", "dog"), novel_indices=[1]) == NovelBoost(8.0, (1,))  # LVIS rare classes
    with pytest.raises(ValueError, match=r"novel indices \[2\] are not indices into the vocabulary \(2 names\)"):
        golden_default.boost_for(("cat", "dog"), novel_indices=[2])


# ---------------------------------------------------------------- geometry and image modes
def test_preprocess_is_the_val_transform(small):
    tensor, size = small.preprocess(COFFEE_SAMPLE)
    expected, _ = make_coco_transforms("val", clip_normalisation=True)(Image.open(COFFEE_SAMPLE).convert("RGB"), None)
    assert size == (400, 600) and tuple(tensor.shape[-2:]) == val_resize_hw(400, 600) == (800, 1200)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize("shape", [(30, 1000), (1000, 30)], ids=["wide", "tall"])
def test_boxes_come_back_in_original_pixels(small, small_noresize, shape):
    """Predicting on X (resized inside) and on the resized image R itself (no resize) runs the same
    tensor; X's boxes must be R's scaled by X/R."""
    h, w = shape
    x = Image.open(COFFEE_SAMPLE).convert("RGB").resize((w, h), Image.BILINEAR)
    r, _ = resize(x, None, 800, 1333)
    rh, rw = val_resize_hw(h, w)
    assert r.size == (rw, rh) and max(rh, rw) == 1333
    [dx] = small.predict(x, C65, clip_boxes=False)
    [dr] = small_noresize.predict(r, C65, clip_boxes=False)
    assert dx.image_size == (h, w) and dr.image_size == (rh, rw) and len(dx) > 0
    assert torch.equal(dx.labels, dr.labels) and torch.equal(dx.scores, dr.scores)
    scale = torch.tensor([w / rw, h / rh, w / rw, h / rh])
    assert torch.allclose(dx.boxes, dr.boxes * scale, rtol=1e-6, atol=1e-3)
    [clipped] = small.predict(x, C65)
    assert (clipped.boxes >= 0).all() and (clipped.boxes[:, 0::2] <= w).all() and (clipped.boxes[:, 1::2] <= h).all()


def test_exif_orientation_is_applied(golden_factor1, tmp_path):
    """The coffee photo stored rotated with EXIF orientation 6 ('rotate 90° clockwise to display')
    gives the original's detections of the upright photo, in upright pixels."""
    upright = Image.open(golden.path(PHOTOS["coffee"])).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    assert Image.open(path).size == (224, 336)  # stored portrait, displayed landscape
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(upright))
    [d] = golden_factor1.predict(str(path), C65, clip_boxes=False)
    assert d.image_size == (224, 336)
    _assert_matches_golden(d, golden.load("eval_single_coffee_tcf1.pth")["results"][0])


def test_image_modes_become_rgb(small_noresize):
    base = Image.open(COFFEE_SAMPLE).convert("RGB").resize((96, 64), Image.BILINEAR)
    gray = base.convert("L")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    inputs = [
        gray, np.asarray(gray), np.asarray(gray)[:, :, None], gray.convert("RGB"),  # grayscale 0..3
        base, rgba, np.asarray(rgba), np.asarray(base).astype(np.float32) / 255,  # colour 4..7
        base.convert("CMYK"), base.convert("CMYK").convert("RGB"),  # 8, 9
    ]
    dets = small_noresize.predict(inputs, C65, batch_size=len(inputs))
    for group in ((0, 1, 2, 3), (4, 5, 6, 7)):
        for i in group[1:]:
            assert torch.equal(dets[i].labels, dets[group[0]].labels), i
            assert torch.allclose(dets[i].scores, dets[group[0]].scores, atol=1e-6), i
            assert torch.allclose(dets[i].boxes, dets[group[0]].boxes, atol=1e-4), i
    assert not torch.equal(dets[0].scores, dets[4].scores)  # gray really is another input
    assert all(d.image_size == (64, 96) and len(d) > 0 for d in dets)
    assert torch.allclose(dets[9].scores, dets[8].scores, atol=1e-6)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(small_noresize, tmp_path):
    """A 16-bit grayscale PNG (mode I;16) reads as its 8-bit picture (value / 257), in the Predictor and in the
    training loader, rather than Pillow's convert('RGB'), which clips every value above 255 to white."""
    from datasets.coco import load_rgb_image

    gray = Image.open(COFFEE_SAMPLE).convert("L").resize((96, 64), Image.BILINEAR)
    wide = np.asarray(gray).astype(np.uint16) * 257  # the same picture on 16 bits
    path = tmp_path / "sixteen.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    for rgb in (load_rgb(path), load_rgb(Image.open(path)), load_rgb_image(path, image_id=1, ann_file="x.json")):
        assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], np.asarray(gray))
    [from_file] = small_noresize.predict(str(path), C65)
    [from_8bit] = small_noresize.predict(gray, C65)
    assert torch.equal(from_file.scores, from_8bit.scores) and torch.equal(from_file.boxes, from_8bit.boxes)
    floats = Image.fromarray(np.asarray(gray).astype(np.float32))
    with pytest.raises(ValueError, match=r"image: a 32-bit floating-point image \(mode F\)"):
        load_rgb(floats)


def test_names_the_text_encoder_cuts(golden_factor1):
    """Names longer than `text_len` (15 here) tokens are cut as the original cuts them: a warning naming them;
    two names cut to the same tokens would share one embedding: an error."""
    long_a = "a very long name of some sort of object seen in the kitchen of a house A"
    long_b = long_a[:-1] + "B"
    assert golden_factor1.truncated_names(["cat", long_a]) == [long_a]
    image = Image.open(COFFEE_SAMPLE).convert("RGB").resize((96, 64), Image.BILINEAR)
    with pytest.warns(UserWarning, match=r"1 class name\(s\) are cut to the model's 15 tokens .*kitchen"):
        golden_factor1.predict(image, ["cat", long_a], max_detections=5)
    with pytest.raises(ValueError, match=r"are cut to the same 15 tokens in every prompt and would get one "
                                         r"embedding"):
        golden_factor1.predict(image, ["cat", long_a, long_b], max_detections=5)


def test_main_warns_of_class_names_it_cuts(golden_factor1, capsys):
    """main.py keeps the original's cut (a published number depends on it) and says which names it cuts."""
    from types import SimpleNamespace

    from main import warn_cut_names

    long_name = "a very long name of some sort of object seen in the kitchen of a house"
    dataset = SimpleNamespace(category_list=["cat", long_name, "dog"], ann_file="val.json")
    warn_cut_names(golden_factor1.model.classifier, dataset, None)
    out = capsys.readouterr().out
    assert "warning: 1 of the 3 class names of val.json are cut to --text_len 15 tokens" in out and long_name in out
    warn_cut_names(golden_factor1.model.classifier, SimpleNamespace(category_list=["cat"], ann_file="x.json"))
    assert capsys.readouterr().out == ""


def test_threshold_and_max_detections(small_noresize):
    image = Image.open(COFFEE_SAMPLE).convert("RGB").resize((96, 64), Image.BILINEAR)
    [all_dets] = small_noresize.predict(image, ["cup", "spoon", "table"], max_detections=20)
    assert len(all_dets) == 20 and (all_dets.scores[:-1] >= all_dets.scores[1:]).all()
    cut = float(all_dets.scores[5])
    [kept] = small_noresize.predict(image, ["cup", "spoon", "table"], score_threshold=cut, max_detections=20)
    assert torch.equal(kept.scores, all_dets.scores[all_dets.scores >= cut])
    assert kept.names == all_dets.names[:len(kept)] and set(kept.names) <= {"cup", "spoon", "table"}


# ---------------------------------------------------------------- errors and vocabulary
def test_vocabulary_is_normalised():
    assert normalize_vocabulary([" cat", "cat ", "Cat", "remote   control", "", "  ", "dog\t"]) == (
        "cat", "remote control", "dog")
    for bad in ([], ["", "  "]):
        with pytest.raises(ValueError, match="at least one name"):
            normalize_vocabulary(bad)
    with pytest.raises(TypeError, match="split it first"):
        normalize_vocabulary("cat,dog")
    with pytest.raises(TypeError, match=r"vocabulary\[1\]"):
        normalize_vocabulary(["cat", 3])


def test_clear_errors(small, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    good = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="at least one name"):
        small.predict(good, [" "])
    with pytest.raises(ValueError, match=r"images\[1\] \(.*broken\.jpg\): cannot be read as an image"):
        small.predict([good, broken], ["cat"])
    with pytest.raises(FileNotFoundError, match=r"missing\.png\): file not found"):
        small.predict(tmp_path / "missing.png", ["cat"])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        small.predict(tmp_path, ["cat"])
    with pytest.raises(ValueError, match="expected dtype uint8"):
        small.predict(np.zeros((8, 8, 3), np.int32), ["cat"])
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        small.predict(np.zeros((8, 8, 2), np.uint8), ["cat"])
    with pytest.raises(ValueError, match=r"10x2000 pixels become \(7, 1400\) .* at least 31 pixels"):
        small.predict(np.zeros((10, 2000, 3), np.uint8), ["cat"])
    as_is = Predictor(small.model, resize=False, disk_cache=False)
    with pytest.raises(ValueError, match="at least 31 pixels"):
        as_is.predict(np.zeros((30, 64), np.uint8), ["cat"])
    assert as_is.predict(np.zeros((31, 64), np.uint8), ["cat"])[0].image_size == (31, 64)  # the limit is exact
    with pytest.raises(TypeError, match="expected a file path, a PIL image or a numpy array"):
        small.predict([torch.zeros(3, 8, 8)], ["cat"])
    with pytest.raises(ValueError, match="batch_size 0"):
        small.predict(good, ["cat"], batch_size=0)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        Predictor.from_checkpoint(tmp_path / "nothing.pth")


def test_device_selection():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------- building from checkpoints
def test_ema_weights_and_stored_args(small_checkpoint, small, cache_dir):
    ck = golden.load("checkpoint_tiny.pth")
    assert torch.equal(small.model.objectness_embed.weight, ck["model_ema"]["objectness_embed.weight"])
    assert small.model.query_embed.weight.shape == (30, 4)
    assert small.use_nms is True and small.target_class_factor == 8.0  # the run's --use_nms, factor 8
    plain = Predictor.from_checkpoint(small_checkpoint, use_ema=False, cache_dir=cache_dir)
    assert torch.equal(plain.model.objectness_embed.weight, ck["model"]["objectness_embed.weight"])


def test_bare_state_dict_uses_parser_defaults(tmp_path, cache_dir):
    weights = dict(golden.load("checkpoint_tiny.pth")["model_ema"])
    cut_queries(weights)
    path = tmp_path / "bare.pth"
    torch.save(weights, path)
    p = Predictor.from_checkpoint(path, cache_dir=cache_dir)
    # main.py's defaults (no --use_nms, factor 1); the architecture comes from the tensors.
    assert p.use_nms is False and p.target_class_factor == 1.0
    assert p.model.query_embed.weight.shape == (30, 4) and len(p.model.transformer.decoder.layers) == 3


def test_detector_only_checkpoint_needs_the_clip_archive_and_region_prompt(tmp_path, cache_dir):
    def strip(w):
        for k in [k for k in w if k.startswith(("backbone.0.", "classifier."))]:
            del w[k]

    path = tmp_path / "detector_only.pth"
    save_checkpoint(golden_checkpoint_copy(strip), path)
    # the messages name both ways to give the file: the Python argument and the command-line flag
    with pytest.raises(ValueError, match=r"holds no CLIP weights .*\(Predictor: clip_archive=, command line: "
                                         r"--model_path\)"):
        Predictor.from_checkpoint(path, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"logs/region_prompt_R50.pth: give that file \(Predictor: region_prompt=, "
                                         r"command line: --region_prompt_path\)"):
        Predictor.from_checkpoint(path, clip_archive=golden.path("clip_tiny.pt"), cache_dir=cache_dir)
    p = Predictor.from_checkpoint(path, clip_archive=golden.path("clip_tiny.pt"),
                                  region_prompt=golden.path("region_prompt_tiny.pth"), cache_dir=cache_dir)
    full = golden.load("checkpoint_tiny.pth")["model_ema"]
    own = p.model.state_dict()
    assert own.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(own[key], value), key


# ---------------------------------------------------------------- text embeddings: memory and disk
@pytest.fixture
def text_tower_calls(monkeypatch):
    calls = []
    original = TextClassifier.embed_names

    def counting(self, names):
        calls.append(list(names))
        return original(self, names)

    monkeypatch.setattr(TextClassifier, "embed_names", counting)
    return calls


def test_disk_cache_is_reused_by_a_second_predictor(small_checkpoint, tmp_path, text_tower_calls):
    first = Predictor.from_checkpoint(small_checkpoint, cache_dir=tmp_path, device="cpu")
    emb = first.text_embeddings(C65)
    assert text_tower_calls == [C65]
    first.text_embeddings(["cat", " dog "])
    assert text_tower_calls == [C65], "in memory: no second run"
    second = Predictor.from_checkpoint(small_checkpoint, cache_dir=tmp_path, device="cpu")
    again = second.text_embeddings(C65)
    assert text_tower_calls == [C65], "the second predictor read the disk cache"
    assert torch.equal(again, emb)
    # The cached vectors are the classifier's: the original's embeddings of the 65 names.
    assert (again - golden.load("text_features.pth")["eval"]).abs().max() <= 1e-5
    second.text_embeddings(["cat", "remote control"])
    assert text_tower_calls == [C65, ["remote control"]], "only the new name is encoded"
    assert len(list(tmp_path.glob("*.pt"))) == 1
    off = Predictor.from_checkpoint(small_checkpoint, disk_cache=False)
    assert off.text_cache is None
    off.text_embeddings(["cat"])
    assert text_tower_calls[-1] == ["cat"]


def test_disk_cache_is_invalidated_by_weights_and_text_len(small_checkpoint, tmp_path, text_tower_calls):
    def nudge(w):
        w["classifier.ln_final.bias"] = w["classifier.ln_final.bias"] + 0.01

    def longer(args):
        args.text_len = 20

    base = Predictor.from_checkpoint(small_checkpoint, cache_dir=tmp_path)
    reference = base.text_embeddings(["cat"])
    paths = {}
    for name, checkpoint in (("weights", golden_checkpoint_copy(cut_queries, nudge)),
                             ("text_len", golden_checkpoint_copy(cut_queries, args_change=longer))):
        paths[name] = tmp_path / f"{name}.pth"
        save_checkpoint(checkpoint, paths[name])
    calls_before = len(text_tower_calls)
    changed_weights = Predictor.from_checkpoint(paths["weights"], cache_dir=tmp_path)
    changed_len = Predictor.from_checkpoint(paths["text_len"], cache_dir=tmp_path)
    assert changed_len.model.classifier.text_len == 20
    fingerprints = {base.text_cache.fingerprint, changed_weights.text_cache.fingerprint,
                    changed_len.text_cache.fingerprint}
    assert len(fingerprints) == 3
    for p in (changed_weights, changed_len):
        assert not torch.equal(p.text_embeddings(["cat"]), reference)
    assert text_tower_calls[calls_before:] == [["cat"], ["cat"]], "both recomputed"


def test_damaged_cache_file_is_ignored_and_rewritten(small_checkpoint, tmp_path, text_tower_calls):
    p = Predictor.from_checkpoint(small_checkpoint, cache_dir=tmp_path)
    p.text_cache.path.parent.mkdir(parents=True, exist_ok=True)
    p.text_cache.path.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.text_embeddings(["cat"])
    assert any("ignored" in str(w.message) for w in caught)
    assert text_tower_calls == [["cat"]]
    fresh = Predictor.from_checkpoint(small_checkpoint, cache_dir=tmp_path)
    fresh.text_embeddings(["cat"])
    assert text_tower_calls == [["cat"]], "the rewritten file is read"


def test_image_scale_comes_from_the_stored_args(tmp_path, cache_dir):
    """A run trained with --image_scale (the toy world's 0.32) is served at that scale: the val resize's
    800 / 1333 become 256 / 427; an explicit image_scale overrides the stored one."""
    path = tmp_path / "scaled.pth"
    save_checkpoint(golden_checkpoint_copy(cut_queries, args_change=lambda a: setattr(a, "image_scale", 0.32)), path)
    p = Predictor.from_checkpoint(path, cache_dir=cache_dir)
    assert p.image_scale == 0.32
    tensor, size = p.preprocess(COFFEE_SAMPLE)
    expected, _ = make_coco_transforms("val", clip_normalisation=True, image_scale=0.32)(
        Image.open(COFFEE_SAMPLE).convert("RGB"), None)
    assert size == (400, 600) and tuple(tensor.shape[-2:]) == (256, 384)
    assert torch.equal(tensor, expected)
    unscaled = Predictor.from_checkpoint(path, cache_dir=cache_dir, image_scale=1.0)
    assert unscaled.preprocess(COFFEE_SAMPLE)[0].shape[-2:] == (800, 1200)
    with pytest.raises(ValueError, match="image_scale"):
        Predictor(p.model, image_scale=0.0, disk_cache=False)
