"""TrialTwin's FHIR R4 surface: server app, storage, search, operations and FHIR <-> engine mapping."""
