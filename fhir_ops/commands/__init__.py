"""Subcommands of the ``trialtwin`` CLI, one module each (see ``fhir_ops.cli.COMMANDS``)."""
