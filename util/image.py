"""Decoded images as 8-bit RGB, whatever mode the file stored them in."""
from __future__ import annotations

import numpy as np
from PIL import Image

# Integer grayscale modes with more than 8 bits: Pillow's convert('RGB') clips them at 255 (so a 16-bit
# picture comes out nearly all white); they are rescaled from their 16-bit range instead.
WIDE_GRAYSCALE = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image, *, what: str = "image") -> Image.Image:
    """`image` as mode RGB: 8-bit modes through `convert('RGB')` (grayscale replicated, alpha dropped,
    palette and CMYK converted); 16-bit grayscale rescaled to 0..255 (value / 257); 32-bit float images
    are refused (their value range is not known), naming `what`."""
    if image.mode in WIDE_GRAYSCALE:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{what}: {image.mode} pixels outside the 16-bit range 0..65535 "
                             f"({values.min()}..{values.max()}); save the image with 8 or 16 bits per channel")
        gray = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError(f"{what}: a 32-bit floating-point image (mode F) has no known value range; save it with "
                         f"8 or 16 bits per channel")
    return image.convert("RGB")
