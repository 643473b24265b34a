"""The one error type of TrialTwin's FHIR surface and its OperationOutcome form.

Every failure a client can see is raised as a ``FhirError`` (or a subclass) and
rendered in exactly one place (the app's error handler) as application/fhir+json.
"""
from __future__ import annotations

from typing import Iterable

ERROR_SYSTEM = "https://trialtwin.org/fhir/CodeSystem/error"


class FhirError(Exception):
    """An error with an HTTP status, a FHIR issue code and a stable id.

    Parameters
    ----------
    message : str
        Human-readable diagnostics; says what was wrong and, where possible, how to fix it.
    status : int
        HTTP status code.
    code : str
        FHIR ``IssueType`` code (``invalid``, ``not-found``, ``conflict`` ...).
    error_id : str
        Stable, machine-readable id (``version-conflict``, ``unknown-parameter`` ...),
        carried in ``issue.details.coding`` so clients can branch on it.
    expression : list of str, optional
        FHIRPath expressions locating the problem (``Parameters.parameter[2]``, ``Patient.birthDate``).
    severity : str
        ``fatal``, ``error``, ``warning`` or ``information``.
    extra_issues : iterable of dict, optional
        Further OperationOutcome issues (e.g. one per bad CSV line).
    headers : dict, optional
        Extra HTTP headers to send with the response (``WWW-Authenticate``, ``Allow`` ...).
    """

    status = 400
    code = "invalid"
    error_id = "invalid"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_id: str | None = None,
        expression: Iterable[str] | None = None,
        severity: str = "error",
        extra_issues: Iterable[dict] | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if error_id is not None:
            self.error_id = error_id
        self.expression = list(expression or [])
        self.severity = severity
        self.extra_issues = list(extra_issues or [])
        self.headers = dict(headers or {})

    def issue(self) -> dict:
        issue = {
            "severity": self.severity,
            "code": self.code,
            "details": {
                "coding": [{"system": ERROR_SYSTEM, "code": self.error_id}],
                "text": self.message,
            },
            "diagnostics": self.message,
        }
        if self.expression:
            issue["expression"] = self.expression
        return issue

    def to_outcome(self) -> dict:
        """Return the error as an R4 ``OperationOutcome`` resource (a dict)."""
        return {"resourceType": "OperationOutcome", "issue": [self.issue(), *self.extra_issues]}


class InvalidRequest(FhirError):
    status, code, error_id = 400, "invalid", "invalid"


class Unauthorized(FhirError):
    status, code, error_id = 401, "login", "unauthorized"


class Forbidden(FhirError):
    status, code, error_id = 403, "forbidden", "forbidden"


class NotFound(FhirError):
    status, code, error_id = 404, "not-found", "not-found"


class MethodNotAllowed(FhirError):
    status, code, error_id = 405, "not-supported", "method-not-allowed"


class Conflict(FhirError):
    status, code, error_id = 409, "conflict", "conflict"


class Gone(FhirError):
    status, code, error_id = 410, "deleted", "deleted"


class PreconditionFailed(FhirError):
    status, code, error_id = 412, "conflict", "version-conflict"


class PayloadTooLarge(FhirError):
    status, code, error_id = 413, "too-costly", "payload-too-large"


class UnsupportedMediaType(FhirError):
    status, code, error_id = 415, "not-supported", "unsupported-media-type"


class Unprocessable(FhirError):
    status, code, error_id = 422, "processing", "unprocessable"


class TooManyRequests(FhirError):
    status, code, error_id = 429, "throttled", "rate-limited"


def outcome(severity: str, code: str, message: str, *, error_id: str | None = None,
            expression: Iterable[str] | None = None) -> dict:
    """Build a single OperationOutcome issue (for warnings and informational outcomes)."""
    issue = {"severity": severity, "code": code, "diagnostics": message}
    if error_id:
        issue["details"] = {"coding": [{"system": ERROR_SYSTEM, "code": error_id}], "text": message}
    if expression:
        issue["expression"] = list(expression)
    return issue
