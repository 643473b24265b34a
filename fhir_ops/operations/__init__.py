"""FHIR operations: one module per operation, each declared with its OperationDefinition.

``MODULES`` is the one list the registry loads; a new operation adds its module here and its
``profiles/OperationDefinition-<code>.json``.
"""
from __future__ import annotations

import importlib

MODULES = [
    "fhir_ops.operations.validate",  # $validate: [type]/$validate, [type]/[id]/$validate (R4 Resource-validate)
    "fhir_ops.operations.predict_dropout",  # $predict-dropout: Patient/[id], ResearchStudy/[id] (learned dropout risk)
    "fhir_ops.operations.translate",  # $translate: ConceptMap/$translate, ConceptMap/[id]/$translate (R4 ConceptMap-translate)
    "fhir_ops.operations.lookup",  # $lookup: CodeSystem/$lookup (R4 CodeSystem-lookup)
    "fhir_ops.operations.validate_code",  # $validate-code: ValueSet and CodeSystem, type and instance level
    "fhir_ops.operations.import_map",  # $import-map: ConceptMap/$import-map, a new map version as a draft
    "fhir_ops.operations.simulate",  # $simulate: Patient, Group, ResearchStudy instance (twin forecasts, cohort runs)
    "fhir_ops.operations.calibrate",  # $calibrate: Patient instance (new twin-state version when data arrived)
    "fhir_ops.operations.fit_population",  # $fit-population: ResearchStudy, Group instance (FOCEI fit of the study's model)
    "fhir_ops.operations.estimate_effect",  # $estimate-effect: ResearchStudy instance (PROCOVA, external and hybrid controls)
    "fhir_ops.operations.forecast_enrollment",  # $forecast-enrollment: ResearchStudy instance (Poisson-gamma recruitment)
    "fhir_ops.operations.optimize_schedule",  # $optimize-schedule: Patient, ResearchStudy instance (visit days and modality)
    "fhir_ops.operations.verify_audit",  # $verify-audit: system level (the audit trail's hash chain)
    "fhir_ops.operations.export",  # $export: system, Patient, Group and ResearchStudy instance (Bulk Data v2 NDJSON)
    "fhir_ops.operations.deidentify",  # $deidentify: Group, ResearchStudy instance (Safe Harbor NDJSON copy)
    "fhir_ops.operations.ingest_readings",  # $ingest-readings: Observation type (device readings, idempotent)
    "fhir_ops.operations.stratify",  # $stratify: ResearchStudy, Group instance (responder strata from twins, stored as Groups)
    "fhir_ops.operations.safety_signal",  # $safety-signal: ResearchStudy instance (Bayesian AE monitoring, exposure-response forecast)
    "fhir_ops.operations.train_model",  # $train-model: ResearchStudy instance (the learning loop: retrain, shadow, promote)
    "fhir_ops.operations.promote_model",  # $promote-model: ResearchStudy instance (activate a model version by hand)
]


def load_all() -> None:
    """Import every operation module so its ``@operation`` declaration registers it."""
    for module in MODULES:
        importlib.import_module(module)
