"""FHIR search for the embedded store: the parameter registry, index extraction and query parsing."""
from fhir_ops.search.registry import (SEARCH_TYPES, SearchParamDef, search_parameter,
                                      search_parameters_for, supported_search_types)

__all__ = ["SEARCH_TYPES", "SearchParamDef", "search_parameter", "search_parameters_for",
           "supported_search_types"]
