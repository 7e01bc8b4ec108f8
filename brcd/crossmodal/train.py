"""Training loops of the cross-modal teacher and student (pure PyTorch; DDP-aware, no Ray).

Every rank draws the same seeded batches, encodes its slice and all-gathers it, so W DDP workers take
the update of one process on the global batch (tests/test_crossmodal.py checks it); rank 0 runs DCC
on the codes B and broadcasts them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from brcd.crossmodal.dcc import dcc_update
from brcd.crossmodal.nets import HashMLP
from brcd.distributed import gather_no_grad, gather_with_grad, is_distributed, world_info
from brcd.losses.asymmetric import asymmetric_loss, asymmetric_objective
from brcd.losses.djsrh import djsrh_loss

__all__ = ["train_teacher", "train_student", "batches", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def batches(order: np.ndarray, batch_size: int, world: int) -> list[np.ndarray]:
    """Global batches of ``order`` (the last one kept when it has at least max(2, world) items)."""
    out = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [b for b in out if len(b) >= max(2, world)]


def _local(batch: np.ndarray) -> np.ndarray:
    rank, world = world_info()
    return np.array_split(batch, world)[rank]


def _init_nets(seed: int, d_img: int, d_txt: int, bits: int, hidden: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The two networks, seeded and wrapped for DDP when distributed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        nets = HashMLP(d_img, bits, hidden), HashMLP(d_txt, bits, hidden)
    return tuple(torch.nn.parallel.DistributedDataParallel(m) if is_distributed() else m for m in nets)


def _check_inputs(who: str, features: torch.Tensor, tags: torch.Tensor, matrix: torch.Tensor, what: str) -> int:
    n = features.shape[0]
    if tags.shape[0] != n or tuple(matrix.shape) != (n, n):
        raise ValueError(f"{who} inputs disagree: {n} features, {tags.shape[0]} tag rows, {what} {tuple(matrix.shape)}")
    return n


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_teacher(image_features: torch.Tensor, tags: torch.Tensor, affinity: torch.Tensor, t: Any, *, seed: int,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """DJSRH-style unsupervised teacher on (n, d) features and (n, V) tags with the (n, n) joint affinity.

    ``t`` is a ``brcd.config.CrossModalTeacherConfig``. Returns ``{"image", "text", "history"}``."""
    n = _check_inputs("teacher", image_features, tags, affinity, "affinity")
    _, world = world_info()
    img, txt = _init_nets(seed, image_features.shape[1], tags.shape[1], t.bits, t.hidden_dim)
    opt = torch.optim.Adam([*img.parameters(), *txt.parameters()], lr=t.lr)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, t.epochs + 1):
        total, steps = 0.0, 0
        for batch in batches(rng.permutation(n), t.batch_size, world):
            loc = torch.from_numpy(_local(batch))
            bi = gather_with_grad(torch.tanh(t.alpha * img(image_features[loc])))
            bt = gather_with_grad(torch.tanh(t.alpha * txt(tags[loc])))
            idx = torch.from_numpy(batch)
            loss = djsrh_loss(bi, bt, affinity[idx][:, idx], mu=t.mu, lambda_ii=t.lambda_ii, lambda_it=t.lambda_it,
                              lambda_tt=t.lambda_tt)
            total, steps = total + _step(opt, loss), steps + 1
        history.append({"epoch": epoch, "loss": total / max(steps, 1)})
        if log and (epoch == 1 or epoch % 10 == 0 or epoch == t.epochs):
            log(f"[crossmodal teacher] epoch {epoch}/{t.epochs} loss {history[-1]['loss']:.4f}")
    return {"image": unwrap(img), "text": unwrap(txt), "history": history}


def _outputs(net: torch.nn.Module, x: torch.Tensor, omega: np.ndarray) -> torch.Tensor:
    """tanh(net(x[omega])) of the whole set, each rank computing its slice (all-gathered, no grad)."""
    with torch.no_grad():
        return gather_no_grad(torch.tanh(net(x[torch.from_numpy(_local(omega))])))


def train_student(image_features: torch.Tensor, tags: torch.Tensor, similarity: torch.Tensor, s: Any, *, seed: int,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The asymmetric student on the (n, n) similarity S: rounds of (sample Omega, SGD on f and g with
    B fixed, DCC on B). ``s`` is a ``brcd.config.CrossModalStudentConfig``.

    Returns ``{"image", "text", "codes" (n, L) float {-1, +1}, "history"}``; history has the
    objective J after every DCC update (it never increases within an update)."""
    n = _check_inputs("student", image_features, tags, similarity, "S")
    rank, world = world_info()
    f, g = _init_nets(seed + 1, image_features.shape[1], tags.shape[1], s.bits, s.hidden_dim)
    opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=s.lr)
    rng = np.random.default_rng(seed + 1)
    codes = torch.from_numpy(rng.choice([-1.0, 1.0], size=(n, s.bits))).float()
    m = n if s.sample_size is None else min(s.sample_size, n)
    history = []
    for it in range(1, s.outer_iters + 1):
        omega = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        total, steps = 0.0, 0
        for _ in range(s.inner_epochs):
            for batch in batches(rng.permutation(omega), s.batch_size, world):
                loc = torch.from_numpy(_local(batch))
                u = gather_with_grad(torch.tanh(f(image_features[loc])))
                v = gather_with_grad(torch.tanh(g(tags[loc])))
                idx = torch.from_numpy(batch)
                loss = asymmetric_loss(u, v, codes, similarity[idx], idx, gamma=s.gamma)
                total, steps = total + _step(opt, loss), steps + 1
        u, v = _outputs(f, image_features, omega), _outputs(g, tags, omega)
        idx = torch.from_numpy(omega)
        before = float(asymmetric_objective(u, v, codes, similarity[idx], idx, gamma=s.gamma))
        if rank == 0:
            codes = dcc_update(codes, u, v, similarity[idx], idx, gamma=s.gamma, sweeps=s.dcc_sweeps)
        if is_distributed():
            dist.broadcast(codes, src=0)
        after = float(asymmetric_objective(u, v, codes, similarity[idx], idx, gamma=s.gamma))
        history.append({"round": it, "loss": total / max(steps, 1), "objective_before_dcc": before,
                        "objective_after_dcc": after})
        if log and (it == 1 or it == s.outer_iters or it % 4 == 0):
            log(f"[crossmodal student] round {it}/{s.outer_iters} loss {history[-1]['loss']:.3f} "
                f"J {before:.4g} -> {after:.4g} (DCC)")
    return {"image": unwrap(f), "text": unwrap(g), "codes": codes, "history": history}
