"""Ray's own log lines that look broken in a healthy run: dropped from the default output, shown with ``brcd -v``.

Each entry names its source exactly (a logger, or a C++ file in a worker's forwarded stderr) and the
message; anything else Ray logs passes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

# logger -> pattern that the start of the message matches (``.`` stops at a line end)
RECORD_NOISE = {
    # Ray >= 2.59 turns token auth on for a new local cluster and warns so on every run; that is the
    # setting we want (a disabled-auth warning stays). Dropped even with -v, as before.
    "ray._private.authentication.authentication_token_setup": r"Token authentication is enabled for this Ray cluster",
    # Tune's ExperimentAnalysis reads result.json / progress.csv of every trial, also of trials that never
    # started (their last_result is never None); the tables brcd prints use Tune's in-memory results.
    "ray.tune.analysis.experiment_analysis":
        r"Failed to fetch metrics for \d+ trial\(s\):(\n- .*: FileNotFoundError\('Could not fetch metrics for .*\))+\Z",
}
# Forwarded worker stderr: Ray Train's PreemptionWatcher (on by default on a joined cluster, whose nodes may be
# preemptible) is created with max_restarts=-1 and actor handles as arguments, so the controller's core worker
# logs this error on every run (Ray issue 53727).
WORKER_NOISE = re.compile(r"\[[^]]*\] core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: "
                          r"'\w+' has constructor arguments in the object store and max_restarts > 0")


def _keep(pattern: re.Pattern, record: logging.LogRecord) -> bool:
    return not pattern.match(record.getMessage())


FILTERS = {name: functools.partial(_keep, re.compile(pattern)) for name, pattern in RECORD_NOISE.items()}
ALWAYS = ("ray._private.authentication.authentication_token_setup",)


def quiet_ray_logs(quiet: bool = True) -> None:
    """Install the logger filters (``quiet``), or remove all but the always-on ones (``brcd -v``)."""
    for name, drop in FILTERS.items():
        if quiet or name in ALWAYS:
            logging.getLogger(name).addFilter(drop)  # a no-op when already there
        else:
            logging.getLogger(name).removeFilter(drop)


def drop_worker_noise(batch: dict[str, Any]) -> dict[str, Any] | None:
    """A log-monitor batch (``lines`` of one worker) without ``WORKER_NOISE``; None when nothing is left."""
    lines = batch.get("lines") or []
    kept = [line for line in lines if not WORKER_NOISE.match(line)]
    if lines and not kept:
        return None
    return batch if len(kept) == len(lines) else {**batch, "lines": kept}


def filter_worker_output() -> None:
    """Wrap Ray's printer of worker output (the ``(Actor pid=...)`` lines) so it skips ``WORKER_NOISE``; call
    after ``ray.init``, which installs that printer (Ray offers no filter of its own)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # Ray internals moved: the lines are printed as before
        return
    printer = dict(dispatcher.handlers).get("ray_print_logs")
    if printer is None or getattr(printer, "drops_noise", False):
        return

    def filtered(batch: dict[str, Any]) -> None:
        kept = drop_worker_noise(batch)
        if kept is not None:
            printer(kept)

    filtered.drops_noise = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def cluster_runtime_env(address: str) -> dict[str, Any] | None:
    """The job-level runtime env that tells the cluster's workers which Ray they belong to.

    Ray Train's placement-group cleaner (a detached actor) finds the State API through ``RAY_ADDRESS``, else
    by scanning the host's processes: next to a second Ray instance that raised "Found multiple active Ray
    instances" and killed its monitor thread (a 28-line traceback, and no clean-up after a crash)."""
    if address.startswith("ray://") or '"RAY_ADDRESS"' in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        return None  # a client connection, or the job's own runtime env already sets it (a merge conflict)
    try:
        from ray._private.services import canonicalize_bootstrap_address

        gcs = canonicalize_bootstrap_address(address)  # what ray.init connects to ($RAY_ADDRESS wins)
    except Exception:  # no cluster found: ray.init says so
        return None
    return {"env_vars": {"RAY_ADDRESS": gcs}} if gcs else None
