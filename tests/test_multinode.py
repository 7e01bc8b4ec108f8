"""A real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): distillation with
2 DDP workers placed STRICT_SPREAD runs one worker per node and completes."""

from __future__ import annotations

import socket

import pytest

from brcd import io
from conftest import tiny_config

pytestmark = pytest.mark.ray


def _free_port() -> int:
    """Cluster nodes default to the fixed dashboard port 8265, taken by any other local Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(trained_run):
    """Head (1 CPU, dashboard on 127.0.0.1: Ray Train needs the State API) + a second node (1 CPU).
    Depends on ``trained_run`` so the shared session's teacher is trained before it is shut down."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared single-node session; ``ray_local`` starts a new one lazily later
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port()})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_distill_strict_spread_runs_one_worker_per_node(trained_run, two_nodes):
    import ray
    from ray.util.state import list_actors

    from pipelines.stages import Run, distill_stage

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2
    cfg = tiny_config("resources.num_workers=2", "resources.placement_strategy=STRICT_SPREAD",
                      "distill.optim.epochs=1")
    run = Run(cfg, trained_run)
    info = distill_stage(run)

    workers = list_actors(address=two_nodes.address, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == nodes  # one worker on each node
    assert info["epochs"] == 1 and set(info["best"]) == {"map_symmetric", "map_asymmetric"}
    stage = io.load_json(trained_run / "student" / "stage.json")
    assert stage["settings_hash"] == info["settings_hash"]
    for m in ("map_symmetric", "map_asymmetric"):
        assert io.load_state_dict(trained_run / "student" / f"best_{m}.safetensors")
