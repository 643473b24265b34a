"""The one FHIR <-> engine translation layer: FHIR resources in, plain engine inputs out, and back."""
