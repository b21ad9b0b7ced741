"""Detections drawn on an image: one colour per class, "name score" labels kept inside the picture."""
from __future__ import annotations

import colorsys

PALETTE_SIZE = 20


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class `index`: a fixed palette of 20 (10 hues, bright then dark), consecutive
    indices 7/10 of the hue circle apart; class i and i + 20 share a colour."""
    k = index % PALETTE_SIZE
    hue = ((k * 7) % 10) / 10
    value = 0.95 if k < 10 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 bundles a scalable font
    except TypeError:
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def drawing_sizes(width: int, height: int) -> tuple[int, int]:
    """(box line width, label font size) for an image: readable when the image is shown at ~800 px."""
    short = min(width, height)
    return max(2, round(short / 250)), max(12, round(short / 32))


def annotate(image, boxes, labels, names, scores, *, gt_boxes=None):
    """Draw detections on a copy of an RGB PIL image.

    boxes: `[K,4]` xyxy pixels; labels: class indices (colour); names, scores: the label text.
    Lower scores are drawn first so the best detections stay on top; labels are kept inside the image.
    Returns `(annotated image, regions)`, regions: per detection the `(x0, y0, x1, y1)` pixel rectangle
    (inclusive) that contains everything drawn for it (box outline and label).
    """
    from PIL import ImageDraw

    out = image.copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line, font_size = drawing_sizes(width, height)
    font = _font(font_size)
    pad = max(1, font_size // 6)
    if gt_boxes is not None:
        for x0, y0, x1, y1 in gt_boxes:
            r = [round(x0), round(y0), max(round(x0), round(x1)), max(round(y0), round(y1))]
            draw.rectangle(r, outline=(0, 0, 0), width=3)
            draw.rectangle(r, outline=(255, 255, 255), width=1)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    placed = {}
    for i in order:
        x0, y0, x1, y1 = (round(float(v)) for v in boxes[i])
        x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
        x1, y1 = min(max(x1, x0), width - 1), min(max(y1, y0), height - 1)
        draw.rectangle([x0, y0, x1, y1], outline=class_colour(int(labels[i])), width=line)
        placed[i] = (x0, y0, x1, y1)
    regions = [None] * len(scores)
    for i in order:
        x0, y0, x1, y1 = placed[i]
        text = f"{names[i]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge; always inside the image.
        ly = y0 - h if y0 - h >= 0 else y0
        ly = max(0, min(ly, height - h))
        lx = max(0, min(x0, width - w))
        colour = class_colour(int(labels[i]))
        draw.rectangle([lx, ly, lx + w - 1, ly + h - 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((lx + pad - left, ly + pad - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 150 else (255, 255, 255))
        regions[i] = (min(x0, lx), min(y0, ly), max(x1, lx + w - 1), max(y1, ly + h - 1))
    return out, regions
