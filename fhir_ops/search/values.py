"""Value conversions shared by indexing and querying: FHIR dates as ranges, normalized strings, references.

Both sides must agree byte for byte, so they live in one place.
"""
from __future__ import annotations

import calendar
import re
import unicodedata

from fhir_ops.errors import InvalidRequest

#: stand-ins for open period ends (seconds since the epoch)
LOW_INF = -1e15
HIGH_INF = 1e15

_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def date_range(text: str) -> tuple[float, float] | None:
    """Return the half-open range [low, high) in epoch seconds that a FHIR date/dateTime/instant covers.

    A partial date covers its whole period (``2024`` is the year); a time without zone is read as UTC.
    Returns None when ``text`` is not a FHIR date.

    Examples
    --------
    >>> low, high = date_range("2024-02")
    >>> (high - low) / 86400
    29.0
    >>> date_range("2024-01-01T10:00:00+01:00") == date_range("2024-01-01T09:00:00Z")
    True
    >>> date_range("yesterday") is None
    True
    """
    m = _DATE.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    year, month, day, hh, mi, ss, frac, tz = m.groups()
    y = int(year)
    try:
        if month is None:
            return float(calendar.timegm((y, 1, 1, 0, 0, 0))), float(calendar.timegm((y + 1, 1, 1, 0, 0, 0)))
        mo = int(month)
        if not 1 <= mo <= 12:
            return None
        if day is None:
            nxt = (y + 1, 1) if mo == 12 else (y, mo + 1)
            return (float(calendar.timegm((y, mo, 1, 0, 0, 0))),
                    float(calendar.timegm((*nxt, 1, 0, 0, 0))))
        d = int(day)
        if not 1 <= d <= calendar.monthrange(y, mo)[1]:
            return None
        if hh is None:
            low = float(calendar.timegm((y, mo, d, 0, 0, 0)))
            return low, low + 86400.0
        h, mi_, s = int(hh), int(mi), int(ss or 0)
        if h > 23 or mi_ > 59 or s > 60:
            return None
        low = float(calendar.timegm((y, mo, d, h, mi_, s)))
        if frac:
            low += int(frac) / 10 ** len(frac)
            width = 10.0 ** -len(frac)
        else:
            width = 1.0 if ss is not None else 60.0
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            low -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
        return low, low + width
    except (ValueError, OverflowError):
        return None


def parse_date_param(text: str, name: str) -> tuple[float, float]:
    """Like :func:`date_range` but raise ``InvalidRequest`` naming the search parameter."""
    rng = date_range(text)
    if rng is None:
        raise InvalidRequest(f"search parameter {name!r}: {text!r} is not a FHIR date (YYYY, YYYY-MM, "
                             f"YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss][Z|+hh:mm])", error_id="invalid-search-value")
    return rng


def normalize_string(text: str) -> str:
    """Fold a string for FHIR string search: case-insensitive and accent-insensitive.

    Examples
    --------
    >>> normalize_string("  Müller-Lüdenscheidt ")
    'muller-ludenscheidt'
    """
    if text.isascii():
        return text.strip().lower()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).strip().casefold()


def split_reference(ref: str) -> tuple[str | None, str]:
    """Split a reference into (resource type, id); unrecognised forms come back as (None, ref).

    Examples
    --------
    >>> split_reference("Patient/123")
    ('Patient', '123')
    >>> split_reference("https://ehr.example/fhir/Patient/p-1/_history/3")
    ('Patient', 'p-1')
    >>> split_reference("urn:uuid:5c6b")
    (None, 'urn:uuid:5c6b')
    """
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha() and parts[-1]:
        return parts[-2], parts[-1]
    return None, ref
