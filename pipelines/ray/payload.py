"""What the driver hands a Ray process (a Train worker's ``train_loop_config``, a Ray Data actor's argument).

Workers need no shared disk: the split and small arrays travel inline, weights as ``ObjectRef``s.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brcd import builders
from brcd.config import Config


@dataclass(frozen=True)
class WorkerPayload:
    cfg: Config  # the driver's validated config (not re-validated on the worker)
    split_files: dict[str, bytes] = field(default_factory=dict)  # the driver's split files, by name
    split_fingerprint: str = ""
    scratch: str | None = None  # preferred parent of the worker's scratch folder
    models: dict[str, dict[str, Any]] | None = None  # encode: name -> {model, weights, parts[, features]}
    teacher_weights: Any = None  # distill and its bank: the teacher's bytes (an ObjectRef)
    teacher_db_codes: np.ndarray | None = None
    clusters: dict[str, Any] | None = None  # labels, centroids, masks_by_length
    bank: dict[str, Any] | None = None  # the view bank's handle (pipelines.ray.bank_job.open_bank)
    eval_features: dict[str, np.ndarray] | None = None  # the exact caches validation encodes from
    weights: Any = None  # a feature cache's backbone weights (None: the seeded backbone)
    seed: int | None = None  # the cross-modal job's seed
    arrays: dict[str, np.ndarray] | None = None  # the cross-modal job's inputs
    rung_gate: dict[str, Any] | None = None  # a Tune trial's ASHA rungs: pipelines.ray.workers.gated_report

    def setup(self) -> tuple[Config, Any, Path]:
        """The config, the data bundle over the driver's split and a scratch folder (under ``scratch`` if this
        node can write there, else the system temp folder; removed at exit), in any Ray process."""
        cfg = self.cfg
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
        base = None
        if self.scratch:
            with contextlib.suppress(OSError):
                Path(self.scratch).mkdir(parents=True, exist_ok=True)
                base = self.scratch
        workdir = Path(tempfile.mkdtemp(prefix="worker-", dir=base))
        atexit.register(shutil.rmtree, workdir, True)
        split_dir = workdir / "split"
        split_dir.mkdir()
        for name, data in self.split_files.items():
            (split_dir / name).write_bytes(data)
        quiet = logging.getLogger("brcd.data")  # the split is the driver's, which already said where it is
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            bundle = builders.data_bundle(cfg, split_dir)
        finally:
            quiet.setLevel(level)
        if bundle.split.fingerprint != self.split_fingerprint:
            raise RuntimeError("the worker's split differs from the driver's; the data folder changed under the run")
        return cfg, bundle, workdir
