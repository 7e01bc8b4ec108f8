"""Augmentations as config (data.augment): the natural-image default is CIBHash's recipe, a digits
recipe never flips, bad values fail in one line, and the view bank's fingerprint follows the recipe."""

import numpy as np
import pytest
import torch
from PIL import Image

from brcd.config import AugmentConfig, ConfigError, load_config
from brcd.data import TwoViewTransform
from brcd.data.transforms import augmentation


def _names(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_default_is_cibhash_natural_image_recipe():
    assert _names(augmentation(32)) == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "RandomApply",
                                        "RandomGrayscale", "GaussianBlur", "ToDtype", "Normalize"]
    crop = augmentation(32).transforms[1]
    assert crop.scale == (0.5, 1.0)


def test_demo_recipe_never_flips_and_keeps_the_glyph_upright():
    a = load_config("demo").data.augment
    assert a.hflip == 0 and a.grayscale == 0 and not a.blur and a.rotate > 0
    names = _names(augmentation(32, a))
    assert "RandomHorizontalFlip" not in names and "RandomAffine" in names and "GaussianBlur" not in names
    # a left-right asymmetric image (bright left half) stays brighter on the left in every view
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, :12] = 255
    two = TwoViewTransform(32, a)
    torch.manual_seed(0)
    for _ in range(20):
        v1, v2 = two(Image.fromarray(img))
        for v in (v1, v2):
            assert v[:, :, :16].mean() > v[:, :, 16:].mean()


@pytest.mark.parametrize("key, value, needle", [
    ("hflip", 1.5, "data.augment.hflip is a probability"),
    ("crop_scale", [0.9, 0.5], "data.augment.crop_scale"),
    ("color_jitter", [0.4, 0.4], "data.augment.color_jitter"),
    ("rotate", -3.0, "data.augment: rotate in [0, 180]"),
])
def test_bad_augment_values_fail_in_one_line(key, value, needle):
    with pytest.raises(ConfigError) as exc:
        load_config("demo", [f"data.augment.{key}={value}"])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bank_fingerprint_includes_the_augmentation(tmp_path):
    """Two recipes never share a view bank (its rows are rendered with the recipe)."""
    from conftest import tiny_config
    from pipelines.ray.bank_job import plan_bank
    from pipelines.stages import Run

    frozen = ["teacher.model.freeze_backbone=true", "bank.enabled=true", "bank.views=2", "tracking.enabled=false"]
    a = Run(tiny_config(*frozen), tmp_path / "a")
    b = Run(tiny_config(*frozen, "data.augment.rotate=5.0"), tmp_path / "b")
    pa, pb = plan_bank(a, "teacher"), plan_bank(b, "teacher")
    assert pa.fingerprint["augment"] == {**vars(AugmentConfig()), **vars(a.cfg.data.augment)}
    assert pa.fingerprint["augment"]["rotate"] != pb.fingerprint["augment"]["rotate"]
    assert pa.folder.name != pb.folder.name
