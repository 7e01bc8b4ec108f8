"""Hashing models: any timm backbone + a hash head + codes b = sign(σ(h) − ½) (straight-through sign).

``create_hashing_model(cfg)`` builds the teacher (paper: ViT-B/16, frozen, linear head) or the
student (paper: EfficientNet-B0, frozen, MLP head). The head reads the backbone's pooled features by
default (``head_input="features"``) or its classifier logits (``"logits"``, what the public code
does for EfficientNet / MobileNet students). Heads may be *nested* (NHL): one head emits ``max(bits)``
outputs and the ``L``-bit code is the prefix of length ``L``.

A frozen backbone runs without autograd and stays in eval mode even when the model is put in
training mode, so BatchNorm statistics never drift and no activation memory is kept for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import timm
import torch
from torch import nn

from brcd.config import code_lengths
from brcd.codes import hash_codes
from brcd.io import load_torch_weights

__all__ = ["HashOutput", "HashHead", "HashingModel", "create_backbone", "create_hashing_model", "hash_output"]


@dataclass
class HashOutput:
    """What a forward pass returns. ``logits``: pre-sign outputs h (B, Lmax); ``probs``: sigmoid(h);
    ``codes``: {-1,+1} float codes ``sign(σ(h) − ½)``, gradient ``σ'(h)`` to the logits."""

    logits: torch.Tensor
    probs: torch.Tensor
    codes: torch.Tensor

    def slice(self, start: int, stop: int) -> "HashOutput":
        """Rows ``start:stop`` (e.g. one view of a two-view batch)."""
        return HashOutput(self.logits[start:stop], self.probs[start:stop], self.codes[start:stop])

    def prefix(self, bits: int) -> "HashOutput":
        return HashOutput(self.logits[:, :bits], self.probs[:, :bits], self.codes[:, :bits])


def hash_output(logits: torch.Tensor) -> HashOutput:
    """The outputs a forward pass derives from the head's pre-sign values ``h``."""
    probs = torch.sigmoid(logits)
    return HashOutput(logits=logits, probs=probs, codes=hash_codes(logits, probs))


class HashHead(nn.Module):
    """Linear (teacher) or MLP (student: in -> hidden -> ReLU -> bits) head emitting ``max(bits)`` values."""

    def __init__(self, in_features: int, bits: int | Sequence[int], kind: str = "linear", hidden_dim: int = 1000):
        super().__init__()
        self.bits = sorted(code_lengths(bits))
        out = self.bits[-1]
        if kind == "linear":
            self.net = nn.Linear(in_features, out)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_dim, out))
        else:
            raise ValueError(f"unknown head kind {kind!r}; use 'linear' or 'mlp'")
        self.kind = kind

    @property
    def last_linear(self) -> nn.Linear:
        """The layer whose rows are shared by nested codes (NHL's adaptive weights look at it)."""
        return self.net if isinstance(self.net, nn.Linear) else self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HashingModel(nn.Module):
    """Backbone -> hash head -> (logits, probs, codes)."""

    def __init__(self, backbone: nn.Module, head: HashHead, *, freeze_backbone: bool = True,
                 channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        self.channels_last = channels_last
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def bits(self) -> list[int]:
        return self.head.bits

    def train(self, mode: bool = True) -> "HashingModel":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # no BatchNorm / dropout drift in a frozen backbone
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward_features(self, feats: torch.Tensor) -> HashOutput:
        return hash_output(self.head(feats))

    def forward(self, x: torch.Tensor, *, from_features: bool = False) -> HashOutput:
        """Images -> outputs; ``from_features=True``: ``x`` are backbone features already (the view
        bank's, of a frozen backbone), so that the head still trains through DDP's forward."""
        return self.forward_features(x if from_features else self.features(x))

    @torch.no_grad()
    def encode_features(self, feats: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """:meth:`encode` of images whose backbone features are ``feats`` (an exact feature cache)."""
        return self.encode(feats, bits, from_features=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, bits: int | None = None, *, from_features: bool = False) -> torch.Tensor:
        """{-1,+1} codes as ``int8`` (B, bits); ``bits`` picks a nested length (default: the longest)."""
        was_training = self.training
        self.eval()
        try:
            logits = self.head(images if from_features else self.features(images))
        finally:
            self.train(was_training)
        if bits is not None:
            if bits not in self.bits:
                raise ValueError(f"this model emits {self.bits} bits; --bits {bits} is not one of them")
            logits = logits[:, :bits]
        return torch.where(logits >= 0, 1, -1).to(torch.int8)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


def create_backbone(name: str, *, pretrained: bool = False, weights: str | Path | None = None,
                    head_input: str = "features", **kwargs) -> nn.Module:
    """A timm backbone. ``head_input="features"`` removes the classifier (pooled features);
    ``"logits"`` keeps timm's classifier (e.g. 1000-way ImageNet logits, as the public code does).
    ``weights`` loads a local file (safetensors, or a state dict with ``weights_only=True``)."""
    if head_input not in ("features", "logits"):
        raise ValueError(f"head_input must be 'features' or 'logits', got {head_input!r}")
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ValueError(f"unknown timm backbone {name!r}; similar names: {', '.join(close) or 'none'}")
    if head_input == "features":
        kwargs["num_classes"] = 0
    use_hub = pretrained and weights is None
    try:
        model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except (OSError, RuntimeError) as exc:
        if use_hub:
            raise RuntimeError(f"could not load pretrained weights for {name!r} (no network here?); download them on a "
                               "connected machine and point model.weights at the file (safetensors or state dict), "
                               "or set model.pretrained: false") from exc
        raise
    if weights is not None:
        state = load_torch_weights(weights)
        missing, _, wrong = state_mismatch(model, state)
        if wrong or missing:
            example = (wrong or missing)[0]
            raise ValueError(f"weights file {weights} does not match backbone {name!r} ({len(missing)} missing, "
                             f"{len(wrong)} wrongly shaped tensors, e.g. {example}); use weights saved for this "
                             "architecture")
        model.load_state_dict(state, strict=False)  # only unexpected keys remain, and they are ignored
    return model


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """The model's keys missing from ``state``, the keys of ``state`` it lacks, and its wrongly shaped keys."""
    own = model.state_dict()
    return ([k for k in own if k not in state], [k for k in state if k not in own],
            [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)])


def create_hashing_model(cfg) -> HashingModel:
    """Build a :class:`HashingModel` from a ``brcd.config.ModelConfig`` (or any object with its fields)."""
    kwargs = dict(getattr(cfg, "model_kwargs", None) or {})
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, head_input=cfg.head_input,
                               **kwargs)
    width = int(backbone.num_classes if cfg.head_input == "logits" else backbone.num_features)
    head = HashHead(width, cfg.bits, kind=cfg.head, hidden_dim=cfg.hidden_dim)
    attention = hasattr(backbone, "patch_embed") or any(isinstance(m, nn.MultiheadAttention)
                                                         for m in backbone.modules())
    return HashingModel(backbone, head, freeze_backbone=cfg.freeze_backbone,
                        channels_last=bool(cfg.channels_last and not attention))
