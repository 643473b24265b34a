"""``$verify-audit`` (system level): walk the audit trail's hash chain and report the first broken link.

Checks the journal (fhir_ops.audit.chain) and that each stored AuditEvent still matches its journal record.
"""
from __future__ import annotations

import json

from fhir_ops.audit.chain import GENESIS, Break, canonical, link, verify
from fhir_ops.mapping.audit_event import CHAIN_EXTENSION, chained_content
from fhir_ops.operations.registry import OperationContext, operation

PAGE = 5000


def _stored_mismatch(seq: int, prev: str, digest: str, stored: str | None) -> str | None:
    """Why the stored AuditEvent of record ``seq`` does not match it (None: it matches)."""
    if stored is None:
        return f"the AuditEvent audit-{seq} of this record was deleted"
    resource = json.loads(stored)
    if (resource.get("meta") or {}).get("versionId") not in (None, "1"):
        return f"the AuditEvent audit-{seq} was changed after it was stored (version {resource['meta']['versionId']})"
    chain = next((e for e in resource.get("extension") or [] if e.get("url") == CHAIN_EXTENSION), None)
    marks = {x.get("url"): next((v for k, v in x.items() if k.startswith("value")), None)
             for x in (chain or {}).get("extension") or []}
    if marks != {"sequence": seq, "previous": prev, "hash": digest}:
        return f"the AuditEvent audit-{seq} does not carry this record's place in the chain"
    if link(prev, canonical(chained_content(resource))) != digest:
        return f"the AuditEvent audit-{seq} was changed after it was written: it no longer matches its record"
    return None


def verify_trail(store) -> tuple[int, str, Break | None]:
    """(records checked, head hash, first break) over the whole journal and its stored AuditEvents."""
    after, prev, checked = 0, GENESIS, 0
    while True:
        rows = store.audit_journal(after, PAGE)
        if not rows:
            return checked, prev, None
        verdict = verify([r[:4] for r in rows], start_seq=after + 1, start_prev=prev)
        good = rows[:verdict.checked]
        stored = store.audit_resources([f"audit-{r[0]}" for r in good if r[4]])
        for seq, _, row_prev, digest, drained in good:
            why = _stored_mismatch(seq, row_prev, digest, stored.get(f"audit-{seq}")) if drained else None
            if why is not None:
                return checked, row_prev, Break(seq, why)
            checked += 1
        if verdict.broken is not None:
            return checked, verdict.head, verdict.broken
        after, prev = rows[-1][0], verdict.head


@operation("OperationDefinition-verify-audit.json")
def handle(ctx: OperationContext, params: dict) -> dict:
    checked, head, broken = verify_trail(ctx.store)
    out = {"valid": broken is None, "checked": checked, "head": head}
    if broken is not None:
        out.update(brokenAt=broken.seq, auditEvent={"reference": f"AuditEvent/audit-{broken.seq}"},
                   reason=broken.reason)
    return out
