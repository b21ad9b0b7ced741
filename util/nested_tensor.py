"""A padded image batch with its padding mask (True = padding), as DETR-family models take it."""
from __future__ import annotations

import torch


class NestedTensor:
    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor | None):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> NestedTensor:
        mask = self.mask.to(device, non_blocking=non_blocking) if self.mask is not None else None
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def pin_memory(self) -> NestedTensor:
        """Page-locked copies (the DataLoader's `pin_memory=True` calls this on each batch), so that
        `.to(cuda, non_blocking=True)` copies asynchronously."""
        mask = self.mask.pin_memory() if self.mask is not None else None
        return NestedTensor(self.tensors.pin_memory(), mask)

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tensors, self.mask

    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def nested_tensor_from_tensor_list(tensor_list: list[torch.Tensor]) -> NestedTensor:
    """Zero-pad `[3,H_i,W_i]` images at the bottom/right to the batch max (no size divisibility).

    Returns tensors `[B,3,H,W]` and mask `[B,H,W]`, True on padding.
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    for i, img in enumerate(tensor_list):
        if img.ndim != 3:
            raise ValueError(f"nested_tensor_from_tensor_list: image {i} has shape {tuple(img.shape)}, "
                             f"expected [C,H,W]")
    max_size = [max(s) for s in zip(*[img.shape for img in tensor_list])]
    batch_shape = [len(tensor_list)] + max_size
    b, _, h, w = batch_shape
    first = tensor_list[0]
    tensor = torch.zeros(batch_shape, dtype=first.dtype, device=first.device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def collate_fn(batch):
    """`[(image, target), ...] -> (NestedTensor, tuple_of_targets)`."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images)), targets
