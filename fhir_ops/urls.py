"""The one parser of FHIR request URLs that arrive inside data: Bundle ``entry.request.url``, ``ifNoneExist``.

Authorization and storage must act on the same target, so both use :func:`parse_fhir_url` and
nothing else; whatever it cannot read unambiguously is refused, never guessed at.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, urlencode, urlsplit

from fhir_ops.validation import ID_PATTERN, is_resource_type

#: longest URL accepted inside a Bundle entry (the HTTP layer bounds the request line the same way)
MAX_URL_LENGTH = 8192
# Refused characters: re's \s on str is exactly str.isspace (both Py_UNICODE_ISSPACE), plus the C0 controls,
# '#' (a fragment) and '\\'. One C-level search per URL; a per-character generator cost ~4 us per
# Bundle entry on the write path (bench/write_profile.py).
_REFUSED_CHAR = re.compile(r"[\s\x00-\x1f#\\]")


class UrlError(ValueError):
    """A URL that is not a readable FHIR request URL of this server; the message says why."""


@dataclass(frozen=True)
class FhirUrl:
    """A parsed FHIR request URL relative to the server base.

    ``query`` is None when the URL has no ``?``, else its parameters in order (possibly empty).
    """

    resource_type: str | None = None
    resource_id: str | None = None
    history: bool = False
    version_id: str | None = None
    operation: str | None = None
    query: tuple[tuple[str, str], ...] | None = None

    @property
    def relative(self) -> str:
        """The canonical relative form (``Observation/1/_history/2``, ``Patient?identifier=x``)."""
        parts = [p for p in (self.resource_type, self.resource_id) if p]
        if self.history:
            parts.append("_history")
            if self.version_id:
                parts.append(self.version_id)
        if self.operation:
            parts.append(self.operation)
        path = "/".join(parts)
        return path if self.query is None else f"{path}?{urlencode(self.query)}"


def _same_base(url: str, base: str) -> str | None:
    """The part of absolute ``url`` after ``base`` (scheme and host compared case-insensitively), else None."""
    u, b = urlsplit(url), urlsplit(base.rstrip("/"))
    if (u.scheme.lower(), u.netloc.lower()) != (b.scheme.lower(), b.netloc.lower()):
        return None
    if u.path != b.path and not u.path.startswith(b.path + "/"):
        return None
    rest = u.path[len(b.path):].lstrip("/") if u.path.startswith(b.path + "/") else ""
    if u.path.startswith(b.path + "//"):
        return None  # an empty segment right after the base
    return rest + (f"?{u.query}" if "?" in url else "")


# %XX escapes of ASCII characters, in every case spelling urllib accepts ("%2f", "%2F")
_HEXDIG = "0123456789ABCDEFabcdef"
_ASCII_ESCAPES = {a + b: chr(int(a + b, 16)) for a in _HEXDIG for b in _HEXDIG if int(a + b, 16) < 128}


def _unquote_ascii(text: str) -> str | None:
    """``urllib.parse.unquote(text)`` where every escape is an ASCII character's; else None."""
    if "%" not in text:
        return text
    head, *rest = text.split("%")
    out = [head]
    for piece in rest:
        char = _ASCII_ESCAPES.get(piece[:2])
        if char is None:  # a non-ASCII byte or a malformed escape: urllib decides
            return None
        out += (char, piece[2:])
    return "".join(out)


def parse_qsl_fast(query: str, *, strict: bool = False, max_num_fields: int | None = None) -> list[tuple[str, str]]:
    """``urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=strict, max_num_fields=...)``:
    the same pairs and the same errors, without urllib's generic per-field unquoting for the common case.

    Every conditional create is parsed twice on the write path (entry parsing, then the resend check);
    urllib's parse_qsl and unquote were ~8 % of the HL7 listener's CPU (bench/hl7_listener_profile.py).
    Queries with "+", non-ASCII text, non-ASCII or malformed escapes, or anything strict parsing refuses
    go to urllib itself.

    Examples
    --------
    >>> parse_qsl_fast("identifier=https%3A%2F%2Fx.org%2Fid%7Ca&_count=2")
    [('identifier', 'https://x.org/id|a'), ('_count', '2')]
    """
    if "+" not in query and query.isascii():
        parts = query.split("&")
        if max_num_fields is None or len(parts) <= max_num_fields:
            pairs = []
            for part in parts:
                if not part:
                    if strict:
                        break
                    continue
                name, eq, value = part.partition("=")
                if not eq and strict:
                    break
                if "%" in part:
                    name, value = _unquote_ascii(name), _unquote_ascii(value)
                    if name is None or value is None:
                        break
                pairs.append((name, value))
            else:
                return pairs
    return parse_qsl(query, keep_blank_values=True, strict_parsing=strict, max_num_fields=max_num_fields)


def parse_query(query: str) -> tuple[tuple[str, str], ...]:
    """Parse a search query string strictly (``name=value`` pairs joined by ``&``)."""
    if query == "":
        return ()
    try:
        pairs = parse_qsl_fast(query, strict=True, max_num_fields=200)
    except ValueError as exc:
        raise UrlError(f"malformed query {query!r}: {exc}") from None
    if any(not name for name, _ in pairs):
        raise UrlError(f"malformed query {query!r}: a parameter without a name")
    return tuple(pairs)


# urlencode's quote_plus (safe="") for ASCII text, as one str.translate: letters, digits and "_.-~"
# stay, a space becomes "+", every other character its %XX. Non-ASCII text goes through urlencode.
_QUOTE_PLUS = {c: f"%{c:02X}" for c in range(128)
               if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "_.-~"))}
_QUOTE_PLUS[ord(" ")] = "+"


def encode_query(pairs) -> str:
    """``urllib.parse.urlencode(pairs)`` for ``(name, value)`` string pairs, the same text, faster.

    A conditional create's condition is re-encoded for every Bundle entry that carries one; urlencode's
    per-character quoting was ~40 % of parsing such an entry.

    Examples
    --------
    >>> encode_query([("identifier", "https://x.org/id|a b"), ("_tag", "é")]) == urlencode(
    ...     [("identifier", "https://x.org/id|a b"), ("_tag", "é")])
    True
    """
    out = []
    for name, value in pairs:
        if not (name.isascii() and value.isascii()):
            out.append(urlencode([(name, value)]))
        else:
            out.append(f"{name.translate(_QUOTE_PLUS)}={value.translate(_QUOTE_PLUS)}")
    return "&".join(out)


def parse_fhir_url_cached(url: str, base: str | None = None) -> FhirUrl:
    """:func:`parse_fhir_url`, remembered for short URLs: Bundle entries repeat few URLs (``Observation``,
    ``Patient``), and a FhirUrl is immutable. A URL that fails raises the same error every time."""
    if isinstance(url, str) and len(url) <= 200:
        return _parse_short_url(url, base)
    return parse_fhir_url(url, base)


@lru_cache(maxsize=2048)
def _parse_short_url(url: str, base: str | None) -> FhirUrl:
    return parse_fhir_url(url, base)


def parse_fhir_url(url, base: str | None = None) -> FhirUrl:
    """Parse a FHIR request URL: relative to the server base, or absolute with the server's own base.

    Parameters
    ----------
    url : str
        ``Type``, ``Type/id``, ``Type/id/_history[/vid]``, ``Type/_history``, ``[Type[/id]/]$op``, each
        optionally followed by ``?query``; or the same after this server's base.
    base : str, optional
        The server's FHIR base (``https://host/fhir``); without it absolute URLs are refused.

    Raises
    ------
    UrlError
        Empty segments (``Observation//1``), ``.`` / ``..``, an unknown resource type, an id that is
        not a FHIR id, another server's base, a fragment, whitespace, or any other shape.

    Examples
    --------
    >>> parse_fhir_url("Observation/o1").resource_id
    'o1'
    >>> parse_fhir_url("https://h/fhir/Patient/p1/_history/2", "https://h/fhir").relative
    'Patient/p1/_history/2'
    >>> parse_fhir_url("Observation//o1")
    Traceback (most recent call last):
    ...
    fhir_ops.urls.UrlError: 'Observation//o1' has an empty path segment
    """
    if not isinstance(url, str) or not url:
        raise UrlError("the url is empty or not a string")
    if len(url) > MAX_URL_LENGTH:
        raise UrlError(f"the url is longer than {MAX_URL_LENGTH} characters")
    if _REFUSED_CHAR.search(url) is not None:
        raise UrlError(f"{url[:200]!r} contains whitespace, a control character, '\\' or a fragment")
    relative = url
    if "://" in url.split("?", 1)[0]:
        if not base:
            raise UrlError(f"{url[:200]!r} is absolute; only URLs relative to this server's base are accepted here")
        rest = _same_base(url, base)
        if rest is None:
            raise UrlError(f"{url[:200]!r} is not on this server's base {base}")
        relative = rest
    elif relative.startswith("/"):
        relative = relative[1:]  # "/Patient/1" is relative to the base as well
    path, has_query, query = relative.partition("?")
    segments = path.split("/") if path else []
    if any(s == "" for s in segments):
        raise UrlError(f"{url[:200]!r} has an empty path segment")
    if any(s in (".", "..") or "%" in s for s in segments):
        raise UrlError(f"{url[:200]!r} has a '.', '..' or percent-encoded path segment")
    pairs = parse_query(query) if has_query else None
    operation = segments.pop() if segments and segments[-1].startswith("$") else None
    if operation is not None and (len(operation) < 2 or not operation[1:].replace("-", "").replace("_", "").isalnum()):
        raise UrlError(f"{url[:200]!r}: {operation!r} is not an operation name")
    if not segments:
        return FhirUrl(operation=operation, query=pairs)
    rtype = segments[0]
    if not is_resource_type(rtype):
        raise UrlError(f"{url[:200]!r} does not start with a resource type")
    rest = segments[1:]
    if not rest:
        return FhirUrl(rtype, operation=operation, query=pairs)
    if rest == ["_history"] and operation is None:
        return FhirUrl(rtype, history=True, query=pairs)
    rid = rest[0]
    if not ID_PATTERN.match(rid):
        raise UrlError(f"{url[:200]!r}: {rid!r} is not a FHIR id")
    if len(rest) == 1:
        return FhirUrl(rtype, rid, operation=operation, query=pairs)
    if operation is None and rest[1] == "_history" and len(rest) <= 3:
        vid = rest[2] if len(rest) == 3 else None
        if vid is not None and not ID_PATTERN.match(vid):
            raise UrlError(f"{url[:200]!r}: {vid!r} is not a version id")
        return FhirUrl(rtype, rid, history=True, version_id=vid, query=pairs)
    raise UrlError(f"{url[:200]!r} is not a FHIR interaction URL")


def parse_condition(value, resource_type: str, base: str | None = None) -> tuple[tuple[str, str], ...]:
    """Parse a conditional-create/update condition (``If-None-Exist``, ``ifNoneExist``) for ``resource_type``.

    Accepts a bare query (``identifier=sys|v``, optionally after ``?``) or a search URL of the same type
    (``Patient?identifier=...``, relative or on this server's base, as some clients send).

    Examples
    --------
    >>> parse_condition("identifier=s|1", "Patient")
    (('identifier', 's|1'),)
    >>> parse_condition("Patient?identifier=s|1", "Patient")
    (('identifier', 's|1'),)
    """
    if not isinstance(value, str):
        raise UrlError("the condition must be a string")
    text = value.strip()
    head = text.split("?", 1)[0]
    if "?" in text and head and "=" not in head:
        parsed = parse_fhir_url(text, base)
        if parsed.resource_type != resource_type or parsed.resource_id or parsed.history or parsed.operation:
            raise UrlError(f"condition {value[:200]!r} is not a search of {resource_type}")
        pairs = parsed.query or ()
    else:
        pairs = parse_query(text.lstrip("?"))
    if not pairs:
        raise UrlError("the condition needs a search query such as identifier=system|value")
    return pairs
