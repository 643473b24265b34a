"""The audit trail: one hash-chained AuditEvent for every request to the FHIR server.

``chain`` is the pure tamper evidence; ``recorder`` the Flask hooks that write the journal and drain it
into searchable AuditEvent resources (see docs/audit.md).
"""
