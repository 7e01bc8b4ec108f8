"""MLflow: fail-safe tracking, the model registry and the pyfunc flavour."""
