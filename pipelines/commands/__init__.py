"""The ``brcd`` subcommands beyond the pipeline stages, one module per command group."""
