"""CORA in miniature: a procedural open-vocabulary world small enough to run the whole pipeline on a CPU.

    python -m tools.toy.make_dataset --out data/toy          # detection set + CLIP caption set
    python -m tools.toy.train_clip --data data/toy --out data/toy/clip_toy.pt
    bash tools/toy/run_all.sh                                 # every stage, skipping finished ones

`world` draws the scenes, `make_dataset` writes them in the COCO-OVD layout, `clip_export` writes an
OpenAI-format TorchScript CLIP archive, `train_clip` trains the miniature CLIP on the captions.
"""
