"""Ways in for data that do not arrive as FHIR REST: HL7 v2 over MLLP (and, later, devices and OMOP).

Each connector maps its input with ``fhir_ops.mapping`` and writes through the ``Store`` interface,
one transaction per unit of input, so nothing is ever half stored.
"""
