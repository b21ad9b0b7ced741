"""CLIP archives, region prompts and checkpoints: reading them safely, and the errors for bad ones."""
import argparse
import json
import os
import pickle
import zipfile

import pytest
import torch

from models import build_model
from models.clip import resolve_archive_path
from tests import golden
from tests.helpers import parsed_args
from tests.tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint, load_model_state, pick_weights, save_checkpoint
from util.nested_tensor import NestedTensor
from util.torchscript_archive import ArchiveError, read_state_dict


def test_archive_reader_equals_torchscript_state_dict():
    path = golden.path("clip_tiny.pt")
    ours = read_state_dict(path)
    theirs = torch.jit.load(path, map_location="cpu").state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def _archive_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/code/__torch__.py", "class X(Module):\n  __parameters__ = []\n  __buffers__ = []\n")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_archive_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    archive = tmp_path / "evil.pt"
    _archive_with_pickle(archive, pickle.dumps(_Exploit(str(marker)), protocol=2))
    with pytest.raises(ArchiveError, match="refused"):
        read_state_dict(archive)
    assert not marker.exists()


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="not loaded") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    # the message names what was refused, and never passes on torch's advice to retry with weights_only=False
    assert "GLOBAL" in str(refused.value) and "weights_only" not in str(refused.value)


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello world")
    with pytest.raises(ValueError, match=r"notes.pth is not a torch.save file \(neither a zip nor a pickle; it starts "
                                         r"with b'hello wo'\)"):
        load_checkpoint(text)
    with pytest.raises(ValueError, match=r"clip_tiny.pt is a TorchScript archive .* given as --model_path"):
        load_checkpoint(golden.path("clip_tiny.pt"))
    # and the other way round: a CORA checkpoint where a CLIP archive is expected
    with pytest.raises(ValueError, match=r"checkpoint_tiny.pth is a CORA checkpoint .* pass it as --resume"):
        read_state_dict(golden.path("checkpoint_tiny.pth"))


def test_missing_archive_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr("models.clip.CLIP_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        resolve_archive_path("clip_RN50x4")
    assert "RN50x4.pt" in str(e.value) and str(tmp_path) in str(e.value) and "--model_path" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_model(golden.model_args(model_path=str(tmp_path / "nowhere.pt")))
    with pytest.raises(ValueError, match="clip_RN50"):
        resolve_archive_path("resnet50")


def test_archive_of_another_architecture(tmp_path):
    # a ViT-style state dict: not a ModifiedResNet
    vit = tmp_path / "vit.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, vit)
    with pytest.raises(ValueError, match="ViT"):
        build_model(golden.model_args(model_path=str(vit)))
    # the right kind of archive, but not the size the flags describe
    with pytest.raises(ValueError, match="--text_dim 1024"):
        build_model(golden.model_args(text_dim=1024))


def test_region_prompt_errors(tmp_path):
    bad = tmp_path / "prompt.pth"
    torch.save({"attnpool.positional_embedding": torch.zeros(82, 2560)}, bad)
    with pytest.raises(ValueError, match=r"\(50, 256\)"):
        build_model(golden.model_args(region_prompt_path=str(bad)))
    torch.save({"layer4.0.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="unexpected key"):
        build_model(golden.model_args(region_prompt_path=str(bad)))
    with pytest.raises(FileNotFoundError, match="region prompting"):
        build_model(golden.model_args(region_prompt_path=str(tmp_path / "none.pth")))


def test_region_prompt_replaces_attention_pool_embedding():
    model, _, _ = build_model(golden.model_args())
    prompt = torch.load(golden.path("region_prompt_tiny.pth"), weights_only=True)["attnpool.positional_embedding"]
    assert torch.equal(model.backbone[0].attn_pool.positional_embedding, prompt)
    plain, _, _ = build_model(golden.model_args(region_prompt_path=""))
    clip = read_state_dict(golden.path("clip_tiny.pt"))["visual.attnpool.positional_embedding"]
    assert torch.equal(plain.backbone[0].attn_pool.positional_embedding, clip.float())


def test_checkpoint_key_errors_name_the_keys():
    model, _, _ = build_model(golden.model_args())
    weights = dict(pick_weights(golden.load("checkpoint_tiny.pth"), use_ema=True))
    missing = dict(weights)
    del missing["objectness_embed.bias"]
    with pytest.raises(ValueError, match=r"missing keys: objectness_embed\.bias"):
        load_model_state(model, missing)
    extra = dict(weights, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.extra\.weight"):
        load_model_state(model, extra)
    wrong = dict(weights, **{"query_embed.weight": torch.zeros(1000, 4)})
    with pytest.raises(ValueError, match=r"query_embed\.weight: checkpoint \(1000, 4\) vs model \(300, 4\)"):
        load_model_state(model, wrong)


def test_full_checkpoint_needs_no_archive_or_prompt():
    """--resume on a full checkpoint: architecture and every weight come from the checkpoint."""
    checkpoint = golden.load("checkpoint_tiny.pth")
    args = golden.model_args(model_path="/nonexistent/clip.pt", region_prompt_path="/nonexistent/prompt.pth")
    model, _, _ = build_model(args, checkpoint_weights=checkpoint["model"])
    load_model_state(model, pick_weights(checkpoint, use_ema=True))
    reference, _, _ = build_model(golden.model_args())
    reference.load_state_dict(pick_weights(checkpoint, use_ema=True))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    inputs = golden.load("inputs.pth")
    text = model.classifier(inputs["eval_categories"])
    assert (text - golden.load("text_features.pth")["eval"]).abs().max() <= 1e-5


def test_checkpoint_roundtrip_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["args"].lr == 1e-4 and torch.equal(loaded["model"]["w"], torch.ones(2))

    def crash(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 4}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_golden_checkpoint_loads_with_weights_only():
    checkpoint = load_checkpoint(golden.path("checkpoint_tiny.pth"))
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].device == "cuda"
    assert pick_weights(checkpoint, use_ema=True) is checkpoint["model_ema"]
    assert pick_weights(checkpoint, use_ema=False) is checkpoint["model"]
    assert pick_weights({"model_ema": -1, "model": {"a": torch.zeros(1)}}, use_ema=True)["a"].shape == (1,)
    with pytest.raises(ValueError, match="no 'model'"):
        pick_weights({"epoch": 1}, use_ema=False)


@pytest.fixture(scope="module")
def tiny_model():
    model, _, _ = build_model(golden.model_args())
    model.load_state_dict(pick_weights(golden.load("checkpoint_tiny.pth"), use_ema=True))
    return model.eval()


def test_empty_category_list_is_an_error(tiny_model):
    image = golden.load("inputs.pth")["images"][0][None]
    with pytest.raises(ValueError, match="empty list"):
        tiny_model(image, categories=[])


def test_custom_vocabulary_with_novel_boost_is_an_error(tmp_path):
    """`main.py --target_class_factor 8` on a val json whose classes are neither COCO-OVD's 65 nor marked novel:
    refused at start, as the original's assert (here with a message), before any model is built."""
    import main as cora_main

    root = make_tiny_coco(tmp_path / "coco")["root"]
    ann = root / "annotations" / "instances_val2017_basetarget.json"
    data = json.loads(ann.read_text())
    data["categories"] = data["categories"][:10]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in {c["id"] for c in data["categories"]}]
    ann.write_text(json.dumps(data))
    args = parsed_args("--coco_path", str(root), "--ovd", "--eval", "--target_class_factor", "8", "--device", "cpu")
    with pytest.raises(ValueError, match=r"target_class_factor 8.0 boosts the novel classes .* \(10 names\) has none"):
        cora_main.main(args)


def test_samples_as_tensor_list_or_nested_give_the_same_outputs(tiny_model):
    inputs = golden.load("inputs.pth")
    cats = inputs["eval_categories"]
    with torch.no_grad():
        nested = tiny_model(NestedTensor(inputs["batch"], inputs["mask"]), categories=cats)
        listed = tiny_model(list(inputs["images"]), categories=cats)
        single = tiny_model(inputs["images"][0][None], categories=cats)
        single_nested = tiny_model(NestedTensor(inputs["images"][0][None], torch.zeros(1, 256, 256, dtype=torch.bool)),
                                   categories=cats)
    assert torch.equal(nested["pred_boxes"], listed["pred_boxes"])
    assert torch.equal(single["pred_boxes"], single_nested["pred_boxes"])
    with pytest.raises(TypeError, match="NestedTensor"):
        tiny_model("image.jpg", categories=cats)
