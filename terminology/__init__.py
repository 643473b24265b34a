"""Terminology as data: code-system subsets, ConceptMaps, UCUM units, translate/lookup functions."""
