"""Image transforms of the BRCD / CIBHash protocol (torchvision ``transforms.v2``): the training views
(:class:`TwoViewTransform`, from ``data.augment``) and the clean :func:`eval_transform`.

Outputs are ``float32`` tensors ``(3, size, size)``, ImageNet-normalised.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from brcd.config import AugmentConfig

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (e.g. 224), got {image_size!r}")
    return image_size


def _to_normalised_tensor() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def augmentation(image_size: int, augment: AugmentConfig | None = None) -> v2.Compose:
    """One random view (what :class:`TwoViewTransform` applies twice) from ``augment`` (default
    :class:`~brcd.config.AugmentConfig`). Steps with probability or range 0 are left out, so ``repr``
    (which the view bank fingerprints) names only what runs."""
    size = _check_size(image_size)
    a = augment or AugmentConfig()
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=tuple(a.crop_scale), antialias=True),
    ]
    if a.rotate or a.translate or a.shear:
        steps.append(v2.RandomAffine(degrees=a.rotate, translate=(a.translate, a.translate) if a.translate else None,
                                     shear=a.shear or None,
                                     interpolation=v2.InterpolationMode.BILINEAR))
    if a.hflip:
        steps.append(v2.RandomHorizontalFlip(p=a.hflip))
    if a.color_jitter_p and any(a.color_jitter):
        steps.append(v2.RandomApply([v2.ColorJitter(*a.color_jitter)], p=a.color_jitter_p))
    if a.grayscale:
        steps.append(v2.RandomGrayscale(p=a.grayscale))
    if a.blur:
        steps.append(v2.GaussianBlur(3 if size >= 3 else 1))  # the protocol's 3x3 kernel; identity below 3 px
    return v2.Compose([*steps, *_to_normalised_tensor()])


class TwoViewTransform:
    """Callable ``image -> (view1, view2)``: two independent draws of :func:`augmentation`."""

    def __init__(self, image_size: int, augment: AugmentConfig | None = None) -> None:
        self.image_size = _check_size(image_size)
        self.view = augmentation(self.image_size, augment)

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)

    def __repr__(self) -> str:
        return f"TwoViewTransform(image_size={self.image_size}, view={self.view!r})"


def eval_transform(image_size: int, resize_then_crop: bool) -> v2.Compose:
    """Deterministic transform for evaluation and code extraction: Resize to ``(size, size)``, or with
    ``resize_then_crop`` Resize the short side to ``round(size * 256 / 224)`` then CenterCrop ``size``."""
    size = _check_size(image_size)
    if resize_then_crop:
        geometry: list[v2.Transform] = [
            v2.Resize(max(size, round(size * 256 / 224)), antialias=True),
            v2.CenterCrop(size),
        ]
    else:
        geometry = [v2.Resize((size, size), antialias=True)]
    return v2.Compose([v2.ToImage(), *geometry, *_to_normalised_tensor()])
