"""Benchmark 6 (GPU machines): distillation and teacher steps per GPU, bf16 vs fp32, DDP scaling.

Measured, each with the project's own training steps (:class:`brcd.engine.DistillTask` and
:class:`brcd.engine.TeacherTask`), paper models (teacher ViT-B/16 frozen + linear head, student
EfficientNet-B0 frozen + MLP head), 224 px, per-GPU batch 64, random weights and images that
already sit on the GPU (data loading is not part of the number):

1. distillation step, images/s per GPU, fp32 vs bf16 autocast (``Task.bf16``); ratio bf16 / fp32;
2. teacher training step (CIBHash objective), images/s per GPU, fp32 and bf16;
3. DDP scaling of the distillation step (bf16): 1 process vs N processes (one per GPU,
   ``torch.multiprocessing`` + NCCL, the student wrapped in ``DistributedDataParallel`` and codes
   gathered across ranks exactly as in training). Efficiency = img/s(N) / (N x img/s(1)).
   With one GPU only the 1-GPU number is reported.

"images" counts training images (each has two views, so every step runs each network over
2 x batch images). fp32 keeps PyTorch's defaults (TF32 matmul off, cuDNN TF32 convolutions on).
Without CUDA the benchmark returns one row saying it was skipped (``--allow-cpu`` runs the same
code on the CPU with gloo and the test models: a smoke test of the code path, not a measurement).

Usage: ``python -m benchmarks.bench_gpu [--quick] [--gpus N]``
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .bench_step import StepSetup

BENCH = "bench_gpu: training steps per GPU (bf16 vs fp32) and DDP scaling"


@dataclass
class GpuSetup(StepSetup):
    """The step benchmark's models and sizes at GPU scale, plus the timing schedule."""

    teacher: str = "vit_base_patch16_224"
    image_size: int = 224
    batch_size: int = 64  # per GPU
    warmup: int = 5
    steps: int = 20
    rounds: int = 2


QUICK = GpuSetup(teacher="test_vit", student="test_efficientnet", image_size=64, batch_size=32, bits=32, clusters=4,
                 hidden_dim=64, warmup=2, steps=3, rounds=1, teacher_kwargs={"img_size": 64})
FULL = GpuSetup()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _teacher(setup: GpuSetup, device: torch.device):
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(0)
    return create_hashing_model(ModelConfig(backbone=setup.teacher, bits=setup.bits, head="linear",
                                            model_kwargs=dict(setup.teacher_kwargs))).to(device)


def _student(setup: GpuSetup, device: torch.device):
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(1)
    return create_hashing_model(ModelConfig(backbone=setup.student, bits=setup.bits, head="mlp",
                                            hidden_dim=setup.hidden_dim, channels_last=True)).to(device)


def _clusters(setup: GpuSetup, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centroids = (np.where(rng.random((setup.clusters, setup.bits)) < 0.5, -1.0, 1.0)
                 * (1.0 - 2.0 * rng.uniform(0, 0.5, (setup.clusters, setup.bits)))).astype(np.float32)
    return {"centroids": centroids, "masks": (np.abs(centroids) > 0.5).astype(np.float32),
            "labels": rng.integers(0, setup.clusters, n).astype(np.int64)}


def _eval_sets():
    from brcd.engine import EvalSets

    empty = torch.utils.data.TensorDataset(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    return EvalSets(empty, empty, np.eye(1, dtype=np.float32), np.eye(1, dtype=np.float32), topk=None)


def distill_task(setup: GpuSetup, device: torch.device, bf16: bool, *, ddp_rank: int | None = None, world: int = 1):
    """A :class:`DistillTask` on ``device`` (student wrapped in DDP when ``ddp_rank`` is given)."""
    from brcd.builders import build_objective
    from brcd.config import DistillConfig
    from brcd.engine import DistillTask

    teacher, student = _teacher(setup, device), _student(setup, device)
    params = [p for p in student.parameters() if p.requires_grad]
    model = student
    if ddp_rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(params, lr=1e-3)
    art = _clusters(setup, setup.batch_size * world)
    task = DistillTask(model, opt, teacher, _eval_sets(), teacher_db_codes=np.ones((1, setup.bits), np.int8),
                       objective=build_objective(DistillConfig()), pseudo_labels=art["labels"],
                       centroids=art["centroids"], masks_by_length={setup.bits: art["masks"]}, device=device, bf16=bf16)
    model.train()
    return task


def teacher_task(setup: GpuSetup, device: torch.device, bf16: bool):
    from brcd.engine import TeacherTask

    teacher = _teacher(setup, device)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=5e-4)
    teacher.train()
    return TeacherTask(teacher, opt, _eval_sets(), temperature=0.3, kl_weight=1e-3, device=device, bf16=bf16)


def _batch(setup: GpuSetup, device: torch.device, rank: int = 0):
    g = torch.Generator().manual_seed(100 + rank)
    shape = (setup.batch_size, 3, setup.image_size, setup.image_size)
    v1, v2 = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    pos = torch.arange(rank * setup.batch_size, (rank + 1) * setup.batch_size)
    return v1, v2, pos


def time_steps(task, batch, steps: int, device: torch.device, barrier=None) -> float:
    """Seconds for ``steps`` training steps (GPU synchronised before and after)."""
    if barrier is not None:
        barrier()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        task.train_step(batch)
    _sync(device)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, init: str, setup_dict: dict, backend: str, out_dir: str) -> None:
    import torch.distributed as dist

    from brcd.io import save_json

    setup = GpuSetup(**setup_dict)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        task = distill_task(setup, device, bf16=True, ddp_rank=rank, world=world)
        batch = _batch(setup, device, rank)
        for _ in range(setup.warmup):
            task.train_step(batch)
        seconds = [time_steps(task, batch, setup.steps, device, barrier=dist.barrier) for _ in range(setup.rounds)]
        t = torch.tensor([min(seconds)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            save_json(Path(out_dir) / f"world{world}.json",
                      {"seconds": float(t.item()), "steps": setup.steps, "world": world,
                       "images_per_second": setup.batch_size * world * setup.steps / float(t.item())})
    finally:
        dist.destroy_process_group()


def ddp_images_per_second(setup: GpuSetup, world: int, backend: str) -> float:
    """Global training images/s of the bf16 distillation step with ``world`` processes."""
    import torch.multiprocessing as mp

    from brcd.io import load_json

    with tempfile.TemporaryDirectory() as tmp:
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.spawn(_ddp_worker, args=(world, init, asdict(setup), backend, tmp), nprocs=world, join=True)
        return float(load_json(Path(tmp) / f"world{world}.json")["images_per_second"])


def _fmt_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (smoke test, not a measurement)"


def run(quick: bool = False, *, gpus: int | None = None, allow_cpu: bool = False,
        setup: GpuSetup | None = None) -> list[dict]:
    """Run on the GPU(s); returns rows (a single 'skipped' row when CUDA is unavailable)."""
    setup = setup or (QUICK if quick else FULL)
    if "vit" in setup.teacher and "img_size" not in setup.teacher_kwargs:
        setup = dataclasses.replace(setup, teacher_kwargs={**setup.teacher_kwargs, "img_size": setup.image_size})
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", 0), "nccl"
        n_avail = torch.cuda.device_count()
    elif allow_cpu:
        device, backend, n_avail = torch.device("cpu"), "gloo", 2
    else:
        msg = ("NOT RUN HERE: no GPU on this machine (torch.cuda.is_available() is False); skipped. Run "
               "`brcd bench --only gpu` on a GPU machine to fill this section")
        print(f"bench_gpu: {msg}")
        return [{"benchmark": BENCH, "name": "not run", "value": None, "unit": "", "note": msg}]
    world = min(gpus or n_avail, n_avail)
    name = _fmt_device(device)
    tag = f"{setup.teacher} -> {setup.student}, {setup.image_size} px, batch {setup.batch_size}/GPU"
    rows: list[dict] = []

    # 1. distillation step, fp32 vs bf16, interleaved rounds
    tasks = {"fp32": distill_task(setup, device, bf16=False), "bf16": distill_task(setup, device, bf16=True)}
    batch = _batch(setup, device)
    for task in tasks.values():
        for _ in range(setup.warmup):
            task.train_step(batch)
    secs: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(max(setup.rounds, 1)):
        for key, task in tasks.items():
            secs[key].append(time_steps(task, batch, setup.steps, device))
    ips = {k: setup.batch_size * setup.steps / min(v) for k, v in secs.items()}
    peak = ""
    if device.type == "cuda":
        peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (both tasks)"
    for key in ("fp32", "bf16"):
        rows.append({"benchmark": BENCH, "name": f"distillation step {key} ({tag}) on {name}", "value": ips[key],
                     "unit": "images/s/GPU", "ratio": ips[key] / ips["fp32"] if key == "bf16" else None,
                     "note": f"{setup.steps} steps x best of {setup.rounds} rounds after {setup.warmup} warm-up; "
                             f"median {setup.batch_size * setup.steps / statistics.median(secs[key]):.1f}"
                             + ("; ratio = bf16 / fp32" if key == "bf16" else "") + peak})
    del tasks
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. teacher training step
    ttasks = {"fp32": teacher_task(setup, device, bf16=False), "bf16": teacher_task(setup, device, bf16=True)}
    for task in ttasks.values():
        for _ in range(setup.warmup):
            task.train_step(batch)
    tsecs = {k: min(time_steps(t, batch, setup.steps, device) for _ in range(max(setup.rounds, 1))) for k, t in ttasks.items()}
    for key in ("fp32", "bf16"):
        v = setup.batch_size * setup.steps / tsecs[key]
        rows.append({"benchmark": BENCH, "name": f"teacher training step {key} ({setup.teacher}, frozen backbone + linear head, "
                     f"batch {setup.batch_size}) on {name}", "value": v, "unit": "images/s/GPU",
                     "ratio": v / (setup.batch_size * setup.steps / tsecs["fp32"]) if key == "bf16" else None,
                     "note": "TeacherTask.train_step, both views in one forward" + ("; ratio = bf16 / fp32" if key == "bf16" else "")})
    del ttasks
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. DDP scaling (separate processes; 1 process first, same code path)
    one = ddp_images_per_second(setup, 1, backend)
    rows.append({"benchmark": BENCH, "name": f"DDP distillation step bf16, 1 process ({backend})", "value": one,
                 "unit": "images/s", "note": "torch.multiprocessing, DistributedDataParallel(student), global-batch gather"})
    if world > 1:
        many = ddp_images_per_second(setup, world, backend)
        rows.append({"benchmark": BENCH, "name": f"DDP distillation step bf16, {world} processes ({backend})", "value": many,
                     "unit": "images/s", "ratio": many / (world * one),
                     "note": f"ratio = scaling efficiency img/s({world}) / ({world} x img/s(1)); "
                             f"per GPU {many / world:.1f} img/s; global batch {setup.batch_size * world}"})
    else:
        rows.append({"benchmark": BENCH, "name": "DDP scaling", "value": None, "unit": "",
                     "note": "only 1 GPU visible: scaling efficiency not measured"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick, gpus=a.gpus, allow_cpu=a.allow_cpu), argv,
               ("--gpus", {"type": int, "default": None, "help": "processes for the DDP run (default: all GPUs)"}),
               ("--allow-cpu", {"action": "store_true", "help": "without CUDA, run the code path on the CPU with gloo "
                                                                "(smoke test, not a measurement)"}),
               quick_help="timm test models at 64 px, few steps")

if __name__ == "__main__":
    main()
