"""The cross-modal networks: a frozen image feature extractor (timm backbone or raw pixels), MLP
hash heads for images and tag vectors, and the registrable image / text encoders.

Image networks = frozen feature extractor + trainable MLP head (DJSRH trains only the layers on
top of a fixed CNN); the heads train on features computed once per image. Text networks = MLP on
the tag vector. Every network outputs the pre-activation ``h``; codes are ``sign(h)``, the
relaxation ``tanh(alpha h)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["PixelFeatures", "create_feature_extractor", "extract_features", "HashMLP", "CrossModalEncoder",
           "codes_of"]


class PixelFeatures(nn.Module):
    """The image itself as features: the channel mean, flattened (``image_backbone: pixels``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).flatten(1)


def create_feature_extractor(name: str, image_size: int, *, seed: int = 0, pretrained: bool = False,
                             weights: str | None = None) -> tuple[nn.Module, int]:
    """``(frozen extractor in eval mode, feature width)``. A timm backbone takes ``weights`` (a local
    file) or timm's ``pretrained`` weights; without either it is built from a fixed seed (a frozen
    random convnet: the stand-in where nothing can be downloaded)."""
    if name == "pixels":
        return PixelFeatures().eval(), image_size * image_size
    from brcd.models.nets import create_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_backbone(name, pretrained=pretrained, weights=weights)
    model.eval().requires_grad_(False)
    return model, int(model.num_features)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """(N, d) float32 features of (N, 3, H, W) images in [0, 1] (ImageNet-normalised for timm backbones)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if not isinstance(extractor, PixelFeatures):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (x - mean) / std
    return torch.cat([extractor(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


class HashMLP(nn.Module):
    """``in_dim -> hidden -> bits`` (ReLU), pre-activation output ``h``."""

    def __init__(self, in_dim: int, bits: int, hidden_dim: int = 512):
        super().__init__()
        if in_dim < 1 or bits < 1 or hidden_dim < 1:
            raise ValueError(f"HashMLP sizes must be >= 1, got in_dim={in_dim}, bits={bits}, hidden_dim={hidden_dim}")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossModalEncoder(nn.Module):
    """What the registry stores per modality: optional frozen extractor + hash head -> codes in {-1, +1}."""

    def __init__(self, head: HashMLP, extractor: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.extractor = extractor

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extractor is not None:
            x = extract_features(self.extractor, x)
        return torch.where(self.head(x.float()) >= 0, 1.0, -1.0)


@torch.no_grad()
def codes_of(net: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """sign(net(x)) as int8 {-1, +1} (0 -> +1)."""
    net.eval()
    out = torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return np.where(out.numpy() >= 0, 1, -1).astype(np.int8)
