"""gather_with_grad under a real 2-process gloo group equals single-process training on the whole batch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brcd.distributed import gather_no_grad, gather_with_grad, world_info
from brcd.losses import nt_xent

WORLD = 2
DIM_IN, DIM_OUT, TAU = 5, 4, 0.5


def _data(sizes):
    """Inputs of every rank (views 1 and 2) and the initial weights of the tiny linear layer."""
    g = torch.Generator().manual_seed(0)
    total = sum(sizes)
    x1 = torch.randn(total, DIM_IN, generator=g, dtype=torch.float64)
    x2 = torch.randn(total, DIM_IN, generator=g, dtype=torch.float64)
    layer = torch.nn.Linear(DIM_IN, DIM_OUT).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(DIM_OUT, DIM_IN, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(DIM_OUT, generator=g, dtype=torch.float64))
    return x1, x2, layer


def _step(x1, x2, layer, gather):
    x1 = x1.clone().requires_grad_(True)
    x2 = x2.clone().requires_grad_(True)
    z1 = gather(layer(x1))
    z2 = gather(layer(x2))
    loss = nt_xent(z1, z2, TAU)
    loss.backward()
    return loss.detach(), x1.grad, x2.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _worker(rank, init_file, out_dir, size_sets):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {"world_info": world_info()}
        for name, sizes in size_sets.items():
            x1, x2, layer = _data(sizes)
            start = sum(sizes[:rank])
            sl = slice(start, start + sizes[rank])
            loss, g1, g2, gw, gb = _step(x1[sl], x2[sl], layer, gather_with_grad)
            # DDP convention: parameter gradients are averaged over workers
            for grad in (gw, gb):
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= WORLD
            idx = torch.arange(sizes[rank]) + start + 100 * rank
            results[name] = {
                "loss": loss, "g1": g1, "g2": g2, "gw": gw, "gb": gb,
                "gathered_idx": gather_no_grad(idx),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_not_initialised_is_identity():
    assert world_info() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    y = gather_no_grad(x)
    assert torch.equal(y, x) and not y.requires_grad


@pytest.mark.timeout(60)
def test_two_process_gather_matches_single_process(tmp_path):
    size_sets = {"equal": [3, 3], "uneven": [4, 2]}
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), size_sets), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["world_info"] for r in results] == [(0, 2), (1, 2)]
    for name, sizes in size_sets.items():
        x1, x2, layer = _data(sizes)
        loss, g1, g2, gw, gb = _step(x1, x2, layer, lambda z: z)
        for rank, res in enumerate(results):
            got = res[name]
            start = sum(sizes[:rank])
            sl = slice(start, start + sizes[rank])
            assert torch.allclose(got["loss"], loss, rtol=1e-12), (name, rank)
            # input gradients are WORLD x the single-process ones (undone by DDP's averaging) ...
            assert torch.allclose(got["g1"] / WORLD, g1[sl], rtol=1e-10, atol=1e-12), (name, rank)
            assert torch.allclose(got["g2"] / WORLD, g2[sl], rtol=1e-10, atol=1e-12), (name, rank)
            # ... so the averaged parameter gradients equal single-process training on the whole batch
            assert torch.allclose(got["gw"], gw, rtol=1e-10, atol=1e-12), (name, rank)
            assert torch.allclose(got["gb"], gb, rtol=1e-10, atol=1e-12), (name, rank)
            want_idx = torch.cat([torch.arange(n) + sum(sizes[:r]) + 100 * r for r, n in enumerate(sizes)])
            assert torch.equal(got["gathered_idx"], want_idx), (name, rank)


class _Images(torch.utils.data.Dataset):
    """7 fixed random 16 px images (uneven over 2 ranks)."""

    def __init__(self):
        self.x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def _model():
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(0)
    return create_hashing_model(ModelConfig(backbone="test_resnet", bits=8, freeze_backbone=False)).eval()


def _encode_worker(rank, init_file, out_dir):
    from brcd.engine import encode_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, ds = _model(), _Images()
        np.savez(os.path.join(out_dir, f"enc{rank}.npz"), codes=encode_dataset(model, ds, batch_size=2),
                 features=encode_dataset(model, ds, batch_size=2, features=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sharded_encoding_of_codes_and_backbone_features_matches_one_process(tmp_path):
    """encode_dataset over 2 gloo ranks (each encodes every 2nd image, rows gathered back in order)
    gives every rank the single-process codes, and the backbone's float features (features=True)."""
    from brcd.engine import encode_dataset

    mp.spawn(_encode_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, ds = _model(), _Images()
    codes, feats = encode_dataset(model, ds), encode_dataset(model, ds, features=True)
    assert codes.dtype.name == "int8" and feats.dtype.name == "float32" and feats.shape[0] == 7
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(feats), model.features(ds.x), atol=1e-5)
    for r in range(WORLD):
        got = np.load(tmp_path / f"enc{r}.npz")
        assert (got["codes"] == codes).all()
        assert abs(got["features"] - feats).max() < 1e-5
