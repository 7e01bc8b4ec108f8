"""Ray Tune over BRCD distillation: search space, trials, callbacks and the ``brcd tune`` command."""
