import numpy as np
import pytest
import torch

from brcd import io
from brcd.config import ModelConfig
from brcd.models.nets import HashingModel, create_backbone, create_hashing_model


def tiny(backbone="test_resnet", **kw):
    return create_hashing_model(ModelConfig(backbone=backbone, bits=kw.pop("bits", 16), **kw))


def test_forward_shapes_and_codes():
    m = tiny(head="mlp", hidden_dim=32)
    out = m(torch.randn(3, 3, 32, 32))
    assert out.logits.shape == (3, 16)
    assert set(out.codes.unique().tolist()) <= {-1.0, 1.0}
    codes = m.encode(torch.randn(3, 3, 32, 32))
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 1}


def test_gradients_reach_only_trainable_parameters():
    m = tiny(head="mlp", hidden_dim=32, freeze_backbone=True)
    m.train()
    out = m(torch.randn(4, 3, 32, 32))
    (out.codes * torch.randn_like(out.codes)).sum().backward()  # straight-through sign passes gradient
    for name, p in m.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_backbone_stays_in_eval_mode_and_batchnorm_stats_do_not_drift():
    m = tiny(freeze_backbone=True)
    m.train()
    assert not m.backbone.training and m.head.training
    before = {k: v.clone() for k, v in m.backbone.state_dict().items() if "running" in k}
    assert before, "test_resnet should have BatchNorm running stats"
    m(torch.randn(8, 3, 32, 32) * 5 + 3)
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unfrozen_backbone_trains():
    m = tiny(freeze_backbone=False)
    m.train()
    assert m.backbone.training
    m(torch.randn(2, 3, 32, 32)).codes.sum().backward()
    assert any(p.grad is not None for p in m.backbone.parameters())


def test_vit_with_kwargs_and_logits_input():
    m = create_hashing_model(ModelConfig(backbone="test_vit", bits=8, model_kwargs={"img_size": 32, "patch_size": 4}))
    assert m(torch.randn(2, 3, 32, 32)).logits.shape == (2, 8)
    m2 = tiny(backbone="test_efficientnet", head_input="logits")
    assert m2.head.net.in_features == 1000  # the public code's head sits on 1000-way logits


def test_nested_bits_prefix():
    m = tiny(bits=[8, 16, 32])
    x = torch.randn(2, 3, 32, 32)
    full = m.encode(x)
    assert full.shape == (2, 32)
    assert torch.equal(m.encode(x, bits=8), full[:, :8])
    with pytest.raises(ValueError, match="emits"):
        m.encode(x, bits=12)


def test_local_weights_file(tmp_path):
    src = create_backbone("test_resnet")
    path = io.save_state_dict(tmp_path / "w.safetensors", src.state_dict())
    m = tiny(weights=str(path))
    for k, v in src.state_dict().items():
        if k in m.backbone.state_dict():
            assert torch.equal(m.backbone.state_dict()[k], v)


def test_weights_of_another_architecture_refused(tmp_path):
    path = io.save_state_dict(tmp_path / "w.safetensors", create_backbone("test_efficientnet").state_dict())
    with pytest.raises(ValueError, match="does not match backbone 'test_resnet'"):
        tiny(weights=str(path))


def test_pickle_weights_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "w.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(io.ArtifactError, match="weights_only"):
        tiny(weights=str(path))


def test_unknown_backbone_and_offline_pretrained():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        tiny(backbone="resnet_does_not_exist")
    with pytest.raises(RuntimeError, match="model.weights"):
        tiny(pretrained=True)  # HF_HUB_OFFLINE=1 in conftest: fails fast, with the fix in the message


def _student_objective(h1, h2, b1, b2, t1, t2, pseudo, masks, cents):
    """The whole student objective: its own CIBHash loss + the BRCD loss (method defaults)."""
    from brcd.losses import brcd_loss, teacher_objective

    own, _ = teacher_objective(h1, h2, b1, b2, temperature=0.3, kl_weight=1e-3)
    kd, _ = brcd_loss(b1, t1, t2, pseudo, masks, cents, temperature=0.3, alpha=0.8)
    return own + kd


def test_code_gradient_through_the_model_is_the_methods_sigmoid_straight_through():
    """b = sign(σ(h) − ½) with identity gradient through the sign only: dL/dh = dL/db · σ'(h)."""
    from brcd.codes import sign_ste

    torch.manual_seed(0)
    m = tiny(head="mlp", hidden_dim=32, freeze_backbone=True)
    m.train()
    B, L, K = 6, 16, 3
    out = m(torch.randn(2 * B, 3, 32, 32))
    out.logits.retain_grad()
    t1 = torch.where(torch.rand(B, L) < 0.5, 1.0, -1.0)
    t2 = torch.where(torch.rand(B, L) < 0.2, -t1, t1)
    masks, cents, pseudo = (torch.rand(K, L) < 0.6).float(), torch.randn(K, L) * 0.6, torch.tensor([0, 1, 2, 0, 1, 2])
    v1, v2 = out.slice(0, B), out.slice(B, 2 * B)
    _student_objective(v1.logits, v2.logits, v1.codes, v2.codes, t1, t2, pseudo, masks, cents).backward()

    h = out.logits.detach().clone().requires_grad_(True)
    ref_codes = sign_ste(torch.sigmoid(h) - 0.5)  # the formula, written out
    _student_objective(h[:B], h[B:], ref_codes[:B], ref_codes[B:], t1, t2, pseudo, masks, cents).backward()
    torch.testing.assert_close(out.logits.grad, h.grad, rtol=1e-5, atol=1e-8)
    assert torch.equal(out.codes.detach(), ref_codes.detach())

    # The logit straight-through (gradient 1 instead of σ'(h) <= 1/4) differs: the test can fail.
    g = h.detach().clone().requires_grad_(True)
    wrong = sign_ste(g)
    _student_objective(g[:B], g[B:], wrong[:B], wrong[B:], t1, t2, pseudo, masks, cents).backward()
    assert (g.grad - h.grad).norm() > 0.5 * h.grad.norm()


def test_training_codes_equal_the_stored_codes_even_for_tiny_logits():
    from brcd.codes import hash_codes

    h = torch.tensor([[-1e-9, 0.0, 1e-9, -3.0, 2.0, -1e-30]])
    assert hash_codes(h).tolist() == [[-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]]
    assert torch.equal(hash_codes(h), torch.where(h >= 0, 1, -1).float())  # HashingModel.encode's rule
