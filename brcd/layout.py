"""The output layout: every file and folder name the project writes under an output folder.

Nothing else spells these names; code asks a :class:`RunLayout` (or, for a folder that is not a
run's, the module-level helpers) for the path. ``DIR`` = ``--output``::

    DIR/config.yaml                     resolved config
    DIR/data/split.{npz,json}           the seeded split (made once, reused)
    DIR/teacher/teacher.safetensors     best teacher weights (+ stage.json, teacher_codes.{npz,json})
    DIR/clusters/                       clusters.npz + manifest.json, k_selection.{png,json}, bit_masks.png
    DIR/student/                        best_map_symmetric / best_map_asymmetric.safetensors (+ stage.json)
    DIR/results.json, results.md        final metrics; precision_recall.png, retrieval_grid.png
    DIR/export/student/                 the exported student model folder; export/registered.json
    DIR/mlflow.db, DIR/mlartifacts/     the embedded MLflow backend and its artifacts
    <stage folder>/mlflow_runs/         MLflow run records (teacher/, clusters/, else DIR)
    DIR/ray/                            Ray Train storage, unless resources.storage_path
    DIR/ray_tmp/                        a local Ray's session files (when the path is short enough)
    DIR/tmp/                            the workers' scratch, removed when the command ends
    DIR/crossmodal/seed<N>/<stage>/     ``brcd crossmodal``: image/text.safetensors, codes.npz, history.json,
                                        similarity.npz; seed<N>/results.json; crossmodal/export/
    DIR/crossmodal_results.{json,png}   ``brcd crossmodal``: the summary over seeds

A tuning job's folder is a run folder (its teacher, its split) plus::

    DIR/clusters/k=<K>/                 one cluster artifact per K, shared by the trials
    DIR/trials/<trial id>/              a trial's config.yaml, best_*.safetensors and stage.json
    DIR/tune_results.csv, best_config.yaml, best_trial.json, tune_experiment.json

and a comparison's folder (``brcd compare``) is a run folder (the shared teacher and clusters) plus::

    DIR/students/<method>/seed<k>/      a row's student (+ stage.json) and its row.json
    DIR/compare.json, compare.md, compare.png, compare_nested.png
    DIR/separate/bits<L>/               ``--separate``: a whole single-length comparison per length

Pure standard library (+ :mod:`brcd.io` for the fingerprint): cheap to import anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike

CONFIG_FILE = "config.yaml"
STAGE_FILE = "stage.json"  # a finished stage's marker, written last
TUNE_CONTINUE = "tune_continue.json"  # a Tune trial's last result Tune decided to continue
SPLIT_DIR = "data"
BANK_DIR = "bank"
SPLIT_ARRAYS, SPLIT_MANIFEST = "split.npz", "split.json"
TEACHER_DIR, CLUSTERS_DIR, STUDENT_DIR = "teacher", "clusters", "student"
TEACHER_WEIGHTS = "teacher.safetensors"
TEACHER_CODES, TEACHER_CODES_META = "teacher_codes.npz", "teacher_codes.json"
CLUSTER_ARRAYS, CLUSTER_MANIFEST = "clusters.npz", "manifest.json"
K_SELECTION_PNG, K_SELECTION_JSON = "k_selection.png", "k_selection.json"
BIT_MASKS_PNG = "bit_masks.png"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PRECISION_RECALL_PNG, RETRIEVAL_GRID_PNG = "precision_recall.png", "retrieval_grid.png"
EXPORT_DIR, REGISTERED_JSON = "export", "registered.json"
MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_RECORDS = "mlflow.db", "mlartifacts", "mlflow_runs"
RAY_STORAGE, RAY_TEMP, SCRATCH_DIR = "ray", "ray_tmp", "tmp"
TRIALS_DIR = "trials"
TUNE_RESULTS_CSV, BEST_CONFIG, BEST_TRIAL_JSON = "tune_results.csv", "best_config.yaml", "best_trial.json"
TUNE_STATE_JSON = "tune_experiment.json"
COMPARE_STUDENTS, COMPARE_ROW, COMPARE_SEPARATE = "students", "row.json", "separate"
COMPARE_JSON, COMPARE_MD, COMPARE_PNG, COMPARE_NESTED_PNG = "compare.json", "compare.md", "compare.png", "compare_nested.png"
CROSSMODAL_DIR, CROSSMODAL_RESULTS, CROSSMODAL_PNG = "crossmodal", "crossmodal_results.json", "crossmodal_results.png"
CROSSMODAL_STAGES = ("teacher", "student", "student_no_teacher")  # DIR/crossmodal/seed<N>/<stage>/
CROSSMODAL_IMAGE, CROSSMODAL_TEXT, CROSSMODAL_CODES = "image.safetensors", "text.safetensors", "codes.npz"
CROSSMODAL_HISTORY, CROSSMODAL_SIMILARITY = "history.json", "similarity.npz"
TEACHER_FINGERPRINT_CHARS = 16


def best_weights_name(metric: str) -> str:
    """``best_<metric>.safetensors``: the best weights by a selection metric (``map``, ``map_symmetric``, ...)."""
    return f"best_{metric}.safetensors"


BEST_WEIGHTS_GLOB = best_weights_name("*")


def best_weights(folder: PathLike, metric: str) -> Path:
    return Path(folder) / best_weights_name(metric)


def stage_file(folder: PathLike) -> Path:
    return Path(folder) / STAGE_FILE


def tune_continue_file(trial_folder: PathLike) -> Path:
    return Path(trial_folder) / TUNE_CONTINUE


def mlflow_records_dir(folder: PathLike) -> Path:
    return Path(folder) / MLFLOW_RECORDS


def mlflow_record(folder: PathLike, name: str) -> Path:
    """The record (run id, backend, params hash) of the MLflow run ``name`` kept under ``folder``."""
    return mlflow_records_dir(folder) / f"{name}.json"


def teacher_fingerprint(weights: PathLike) -> str | None:
    """The teacher's fingerprint (the first characters of its weights' SHA-256); ``None`` without weights."""
    from brcd.io import file_sha256

    path = Path(weights)
    return file_sha256(path)[:TEACHER_FINGERPRINT_CHARS] if path.exists() else None


def _at(base: str, *names: str) -> property:
    """A read-only path property: ``self.<base>`` joined with ``names``."""
    return property(lambda self: Path(getattr(self, base), *names))


class RunLayout:
    """The paths of one output folder.

    ``teacher_dir``, ``clusters_dir`` and ``student_dir`` default to sub-folders of ``output``;
    Tune trials and ``brcd compare`` point them elsewhere to share the teacher and cluster caches.
    ``output`` is taken as given (callers resolve it when they need an absolute path).
    """

    def __init__(self, output: PathLike, *, teacher_dir: PathLike | None = None,
                 clusters_dir: PathLike | None = None, student_dir: PathLike | None = None):
        self.output = Path(output)
        self.teacher_dir = Path(teacher_dir or self.output / TEACHER_DIR)
        self.clusters_dir = Path(clusters_dir or self.output / CLUSTERS_DIR)
        self.student_dir = Path(student_dir or self.output / STUDENT_DIR)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.output)!r})"

    config = _at("output", CONFIG_FILE)
    split_dir = _at("output", SPLIT_DIR)
    scratch = _at("output", SCRATCH_DIR)
    ray_storage = _at("output", RAY_STORAGE)
    ray_temp = _at("output", RAY_TEMP)  # Ray's session files of a local Ray started for this folder
    mlflow_db = _at("output", MLFLOW_DB)
    # view banks and exact feature caches (brcd.bank), one folder per fingerprint; shared by every trial of a
    # tuning job, which runs in the job's folder
    bank_root = _at("output", BANK_DIR)

    def bank_dir(self, role: str, fingerprint: str) -> Path:
        return self.bank_root / f"{role}-{fingerprint}"

    def feature_cache_dir(self, role: str, part: str, fingerprint: str) -> Path:
        return self.bank_root / f"features-{role}-{part}-{fingerprint}"

    teacher_weights = _at("teacher_dir", TEACHER_WEIGHTS)
    teacher_codes = _at("teacher_dir", TEACHER_CODES)
    teacher_codes_meta = _at("teacher_dir", TEACHER_CODES_META)

    def teacher_fingerprint(self) -> str | None:
        return teacher_fingerprint(self.teacher_weights)

    clusters_manifest = _at("clusters_dir", CLUSTER_MANIFEST)
    k_selection_png = _at("clusters_dir", K_SELECTION_PNG)
    k_selection_json = _at("clusters_dir", K_SELECTION_JSON)
    bit_masks_png = _at("clusters_dir", BIT_MASKS_PNG)

    @property
    def cluster_files(self) -> list[Path]:
        """The cluster stage's files worth keeping as artifacts (those that exist are logged)."""
        return [self.clusters_manifest, self.k_selection_png, self.bit_masks_png]

    def cluster_cache(self, k: int) -> Path:
        """A tuning job's cluster artifact for ``k`` clusters."""
        return self.output / CLUSTERS_DIR / f"k={k}"

    def student_weights(self, metric: str, student_dir: PathLike | None = None) -> Path:
        """``<student folder>/best_<metric>.safetensors`` (``student_dir`` default: this run's)."""
        return best_weights(student_dir or self.student_dir, metric)

    results_json = _at("output", RESULTS_JSON)
    results_md = _at("output", RESULTS_MD)
    precision_recall_png = _at("output", PRECISION_RECALL_PNG)
    retrieval_grid_png = _at("output", RETRIEVAL_GRID_PNG)
    registered_json = _at("output", EXPORT_DIR, REGISTERED_JSON)

    def export_dir(self, role: str = STUDENT_DIR) -> Path:
        return self.output / EXPORT_DIR / role

    def stage_folder(self, stage: str) -> Path:
        """Where a stage keeps its MLflow run records: the teacher's / clusters' folder (shared by
        every run that points at them), else the output folder."""
        return {"teacher": self.teacher_dir, "clusters": self.clusters_dir}.get(stage, self.output)

    # a tuning job
    trials_dir = _at("output", TRIALS_DIR)
    tune_results = _at("output", TUNE_RESULTS_CSV)
    tune_state = _at("output", TUNE_STATE_JSON)
    best_config = _at("output", BEST_CONFIG)
    best_trial = _at("output", BEST_TRIAL_JSON)

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / str(trial_id)

    # a comparison
    def compare_student_dir(self, method: str, seed: int) -> Path:
        return self.output / COMPARE_STUDENTS / method / f"seed{seed}"

    def compare_separate_dir(self, bits: int) -> Path:
        """``--separate``: the folder of the single-length comparison at ``bits``."""
        return self.output / COMPARE_SEPARATE / f"bits{bits}"

    # the cross-modal job
    crossmodal_results = _at("output", CROSSMODAL_RESULTS)
    crossmodal_png = _at("output", CROSSMODAL_PNG)
    crossmodal_export = _at("output", CROSSMODAL_DIR, EXPORT_DIR)

    def crossmodal_seed(self, seed: int, stage: str | None = None) -> Path:
        """``DIR/crossmodal/seed<N>`` (its ``results.json`` is the seed's marker), or one stage's folder in it."""
        folder = self.output / CROSSMODAL_DIR / f"seed{seed}"
        return folder / stage if stage else folder
