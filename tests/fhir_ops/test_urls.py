"""The one parser of URLs inside data (fhir_ops.urls) and the JSON bounds (fhir_ops.limits)."""
from __future__ import annotations

import json
import random
import re
from urllib.parse import parse_qsl, urlencode

import pytest

from fhir_ops import limits
from fhir_ops.errors import InvalidRequest
from fhir_ops.urls import UrlError, encode_query, parse_condition, parse_fhir_url, parse_fhir_url_cached, parse_qsl_fast

pytestmark = pytest.mark.unit

BASE = "https://h.example/fhir"


@pytest.mark.parametrize("url,relative", [
    ("Observation", "Observation"),
    ("Observation/o-1", "Observation/o-1"),
    ("/Observation/o-1", "Observation/o-1"),
    ("Observation/o-1/_history/3", "Observation/o-1/_history/3"),
    ("Observation/_history", "Observation/_history"),
    ("Patient/p1/$simulate", "Patient/p1/$simulate"),
    ("$lookup", "$lookup"),
    ("Observation?code=a%7Cb&_count=2", "Observation?code=a%7Cb&_count=2"),
    ("Observation?", "Observation?"),
    (f"{BASE}/Observation/o-1", "Observation/o-1"),
    ("HTTPS://H.EXAMPLE/fhir/Observation/o-1", "Observation/o-1"),
])
def test_readable_urls_parse_to_their_canonical_relative_form(url, relative):
    assert parse_fhir_url(url, BASE).relative == relative


@pytest.mark.parametrize("url", [
    "", "Observation//o-1", "//Observation/o-1", "Observation/o-1/", "Observation/./o-1", "Observation/../o-1",
    "Observation/%2e%2e", "Observation/o 1", " Observation", "Observation/o-1#x", "Observation\\o-1",
    "Foo/1", "observation/1", "Observation/" + "x" * 65, "Observation/o-1/_history/3/4", "Observation/o-1/x",
    "https://other.example/fhir/Observation/o-1", "https://h.example/fhirx/Observation/o-1",
    "https://h.example/fhir//Observation/o-1", "https://h.example:444/fhir/Observation/o-1",
    "Observation?a", "Observation?=1", "Observation/o-1/$", "x" * 9000,
])
def test_unreadable_urls_are_refused(url):
    with pytest.raises(UrlError):
        parse_fhir_url(url, BASE)


def test_absolute_urls_need_the_server_base():
    with pytest.raises(UrlError):
        parse_fhir_url(f"{BASE}/Observation/o-1")


@pytest.mark.parametrize("value,pairs", [
    ("identifier=s|1", (("identifier", "s|1"),)),
    ("?identifier=s|1", (("identifier", "s|1"),)),
    ("Patient?identifier=s|1", (("identifier", "s|1"),)),
    (f"{BASE}/Patient?identifier=http://s|1", (("identifier", "http://s|1"),)),
    ("identifier=http://s|1&birthdate=2000", (("identifier", "http://s|1"), ("birthdate", "2000"))),
])
def test_conditions_read_as_a_search_of_the_type(value, pairs):
    assert parse_condition(value, "Patient", BASE) == pairs


@pytest.mark.parametrize("value", ["", "?", "Observation?code=x", "Patient/p1?x=1", "x", 5,
                                   "https://other.example/fhir/Patient?identifier=1"])
def test_bad_conditions_are_refused(value):
    with pytest.raises(UrlError):
        parse_condition(value, "Patient", BASE)


def test_json_bounds():
    assert limits.json_depth({"a": [1, {"b": [2]}]}) == 4
    assert limits.loads(json.dumps(limits_nest(limits.MAX_JSON_DEPTH))) is not None
    for raw in (json.dumps(limits_nest(limits.MAX_JSON_DEPTH + 1)), b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(InvalidRequest) as err:
            limits.loads(raw)
        assert err.value.error_id == "json-too-deep"
    for raw in (b"{", b'{"a": NaN}', b"[Infinity]", b"\xff", b'{"n": ' + b"9" * 5000 + b"}"):
        with pytest.raises(InvalidRequest) as err:
            limits.loads(raw)
        assert err.value.error_id == "malformed-json"
    assert limits.loads(b"[NaN]", allow_nan=True)


def limits_nest(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_refused_characters_are_exactly_whitespace_controls_fragment_and_backslash():
    """The one-regex check refuses exactly what the per-character rule (str.isspace, C0 controls, '#', '\\')
    refused: the pattern over every Unicode code point, parse_fhir_url over every refused one and the
    accepted ones below U+3000, inside a URL."""
    from fhir_ops.urls import _REFUSED_CHAR

    def refused_by_rule(ch: str) -> bool:
        return ch.isspace() or ord(ch) < 32 or ch in "#\\"

    points = [chr(p) for p in range(0x110000)]
    assert [c for c in points if (_REFUSED_CHAR.search(c) is not None) != refused_by_rule(c)] == []
    disagree = []
    for ch in (c for c in points if refused_by_rule(c) or ord(c) < 0x3000):
        try:
            parse_fhir_url(f"Patient/{ch}1")
            refused = False
        except UrlError as exc:
            refused = "whitespace, a control character" in str(exc)
        if refused != refused_by_rule(ch):
            disagree.append(hex(ord(ch)))
    assert disagree == []


def test_encode_query_writes_what_urlencode_writes():
    """The fast condition encoder against urllib's, on random names and values (ASCII controls,
    reserved characters, spaces, percent signs, non-ASCII); both read back to the same pairs."""
    rng = random.Random(21)
    alphabet = [chr(c) for c in range(128)] + list("é€中\U0001F600")
    for _ in range(3000):
        pairs = [("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))),
                  "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))) for _ in range(rng.randrange(1, 4))]
        assert encode_query(pairs) == urlencode(pairs)
        assert parse_qsl(encode_query(pairs), keep_blank_values=True) == parse_qsl(urlencode(pairs), keep_blank_values=True)


def test_the_remembered_url_parse_answers_and_refuses_as_the_parser_does():
    for url in ("Observation", "Patient/p1/_history/2", "Observation?code=a%7Cb", "x" * 300 + "/1"):
        try:
            expected = parse_fhir_url(url)
        except UrlError as exc:
            for _ in range(2):  # the second time from the cache's side as well
                with pytest.raises(UrlError, match="does not start with a resource type"):
                    parse_fhir_url_cached(url)
            assert "resource type" in str(exc)
            continue
        assert parse_fhir_url_cached(url) == expected == parse_fhir_url_cached(url)
    with pytest.raises(UrlError):
        parse_fhir_url_cached("Observation//1")


def _random_queries(n: int, seed: int = 20):
    rng = random.Random(seed)
    pieces = ["a", "identifier", "=", "&", "|", "%", "%2F", "%2f", "%7C", "%3a", "%C3%A9", "%e9", "%zz", "%4", "+",
              " ", "é", "https://x.org/id", "_count", "2", ";", "?", "=="]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(n)]


@pytest.mark.parametrize("strict", [False, True])
def test_parse_qsl_fast_is_urllib_parse_qsl(strict):
    # the same pairs and the same errors as urllib for 5,000 seeded random queries of escapes, separators,
    # malformed escapes, '+' and non-ASCII text, and for the conditions the write path carries
    queries = _random_queries(5000) + [
        "identifier=https%3A%2F%2Ftrialtwin.org%2Ffhir%2Fsid%2Fhl7v2-message%2FLAB%7CM1-1-1",
        "", "&", "a", "a=", "=b", "a=1&&b=2", "a=%", "a=%%41"]
    for q in queries:
        for limit in (None, 3):
            try:
                want = parse_qsl(q, keep_blank_values=True, strict_parsing=strict, max_num_fields=limit)
            except ValueError as exc:
                with pytest.raises(ValueError, match=re.escape(str(exc))):
                    parse_qsl_fast(q, strict=strict, max_num_fields=limit)
            else:
                assert parse_qsl_fast(q, strict=strict, max_num_fields=limit) == want, q
