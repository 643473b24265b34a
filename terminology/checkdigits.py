"""Check digits of LOINC codes (mod 10, Luhn) and SNOMED CT identifiers (Verhoeff).

Map imports use them to catch mistyped target codes even when only a subset of the code system is loaded.
"""
from __future__ import annotations

import re

_LOINC = re.compile(r"^(\d{1,7})-(\d)$")
_SCTID = re.compile(r"^[1-9]\d{5,17}$")

# Verhoeff: multiplication in the dihedral group D5, the position permutation, as published by Verhoeff (1969)
_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
# position permutations: row i is the i-th power of the generating permutation (Verhoeff 1969)
_P1 = [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]
_P = [list(range(10))]
for _ in range(7):
    _P.append([_P1[x] for x in _P[-1]])


def loinc_ok(code: str) -> bool:
    """True if ``code`` has LOINC's shape ``NNNNN-C`` and a correct mod-10 check digit.

    >>> loinc_ok("4548-4"), loinc_ok("4548-5")
    (True, False)
    """
    m = _LOINC.match(code or "")
    if not m:
        return False
    total = 0
    for i, ch in enumerate(reversed(m.group(1))):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10 == int(m.group(2))


def sctid_ok(code: str) -> bool:
    """True if ``code`` is a SNOMED CT identifier (6-18 digits) whose Verhoeff check digit is right.

    >>> sctid_ok("25064002"), sctid_ok("25064003")
    (True, False)
    """
    if not _SCTID.match(code or ""):
        return False
    c = 0
    for i, ch in enumerate(reversed(code)):
        c = _D[c][_P[i % 8][int(ch)]]
    return c == 0


CHECKERS = {"http://loinc.org": (loinc_ok, "a LOINC code (digits, '-', mod-10 check digit)"),
            "http://snomed.info/sct": (sctid_ok, "a SNOMED CT identifier (6-18 digits, Verhoeff check digit)")}

__all__ = ["CHECKERS", "loinc_ok", "sctid_ok"]
