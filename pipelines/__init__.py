"""The Ray layer: Train pipelines, Tune search, MLflow tracking and the ``brcd`` command line."""

import logging as _logging

# faiss announces which SIMD build it loaded at INFO level in every worker; keep consoles readable.
_logging.getLogger("faiss").setLevel(_logging.WARNING)
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
