"""MLflow pyfunc for brcd hashing models, logged as *models from code* (no pickle).

``brcd.mlflow.registry.log_student`` passes this file as ``python_model``; MLflow copies it into the model
and, at load time, runs it: the object given to :func:`mlflow.models.set_model` below is the model.
Its ``load_context`` rebuilds the network from the ``model_dir`` artifact (``model.json`` +
``model.safetensors``) with :class:`brcd.models.encoder.HashEncoder`.

``predict(context, model_input, params=None)``: ``model_input`` is a batch of images: a uint8
array (N, H, W, 3), a list of such arrays, or a list / DataFrame (column ``path``) of file paths;
returns ``int8`` codes (N, bits) in {-1, +1}. ``params={"bits": 32}`` picks a nested prefix length.
Through ``mlflow.pyfunc.load_model(...).predict`` (and serving) MLflow first enforces the logged
signature, which admits the uint8 array form; paths work on ``.unwrap_python_model().predict`` or
with :func:`brcd.mlflow.registry.load_encoder`.
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
