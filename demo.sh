#!/usr/bin/env bash
# CORA on your own images: annotated PNGs and detections.json (all flags: python demo.py --help).
#   bash demo.sh                      # no checkpoint: the bundled miniature model on toy scenes (assets/toy/)
#   CORA_CHECKPOINT=ckpt.pth bash demo.sh   # a CORA checkpoint: the photos in assets/samples/, COCO vocabulary
#   bash demo.sh --input my.jpg --custom_vocabulary "cat,remote control" --resume /path/to/checkpoint.pth
# Paths are taken relative to the current directory; PYTHON selects the interpreter.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/demo.py" "$@"
