"""Pure numerics of the twin engine: models, population fitting, calibration, cohort simulation.

No Flask, no FHIR, no HTTP here; FHIR mapping lives in ``fhir_ops``.
"""
