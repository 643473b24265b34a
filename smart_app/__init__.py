"""SMART on FHIR: the development authorization server and the clinician app."""
