"""FHIR operations: one module per operation, each declared with its OperationDefinition.

``MODULES`` is the one list the registry loads; a new operation adds its module here and its
``profiles/OperationDefinition-<code>.json``.
"""
from __future__ import annotations

import importlib

MODULES = [
    "fhir_ops.operations.validate",  # $validate: [type]/$validate, [type]/[id]/$validate (R4 Resource-validate)
]


def load_all() -> None:
    """Import every operation module so its ``@operation`` declaration registers it."""
    for module in MODULES:
        importlib.import_module(module)
