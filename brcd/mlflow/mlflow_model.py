"""MLflow pyfunc for brcd hashing models, logged as *models from code* (no pickle).

``brcd.mlflow.registry.log_student`` passes this file as ``python_model``; MLflow runs it at load time and
the object given to :func:`mlflow.models.set_model` is the model. ``predict`` takes uint8 images (N, H, W, 3)
(or, on ``.unwrap_python_model()``, lists of arrays or file paths) and returns ``int8`` codes (N, bits) in
{-1, +1}; ``params={"bits": 32}`` picks a nested prefix length.
"""

import numpy as np

import mlflow
from mlflow.pyfunc import PythonModel


class BrcdHashingModel(PythonModel):
    """Images -> int8 {-1,+1} binary codes."""

    def load_context(self, context):
        from brcd.models.encoder import HashEncoder
        from brcd.mlflow.registry import ARTIFACT_KEY

        self.encoder = HashEncoder.from_dir(context.artifacts[ARTIFACT_KEY])

    # ``np.ndarray`` is a hint MLflow does not infer a schema from: the logged signature stays in charge
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        bits = (params or {}).get("bits")
        if bits is not None and int(bits) == self.encoder.max_bits:
            bits = None
        return self.encoder.encode(model_input, bits=bits)


mlflow.models.set_model(BrcdHashingModel())
