"""UCUM unit expressions: parsing, dimensional analysis and exact conversion between compatible units.

Covers the UCUM subset TrialTwin's data use (metric prefixes, SI base and derived units, clinical
and customary units, annotations, the special temperature units); factors are exact fractions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

UCUM_SYSTEM = "http://unitsofmeasure.org"

# Dimension vector order. UCUM itself treats ``mol`` as a dimensionless multiple of Avogadro's
# number; it is kept as its own dimension here so that a count is never silently turned into an
# amount of substance and mass <-> amount needs an explicit molar mass.
_DIMS = ("L", "M", "T", "A", "C", "Q", "F", "N")


class UcumError(ValueError):
    """A unit expression that is not valid UCUM, or a conversion that is not possible."""


@dataclass(frozen=True)
class Unit:
    """A parsed unit: a scale factor to the base units, a dimension vector, and, for the special
    (non-ratio) units ``Cel`` and ``[degF]``, an offset so that ``base = factor * (value + offset)``."""

    code: str
    factor: Fraction
    dims: tuple[int, ...]
    offset: Fraction = Fraction(0)

    @property
    def special(self) -> bool:
        return self.offset != 0 or self.code in _SPECIAL

    def describe_dims(self) -> str:
        parts = [f"{d}^{e}" if e != 1 else d for d, e in zip(_DIMS, self.dims) if e]
        return ".".join(parts) or "1"


def _d(**exps: int) -> tuple[int, ...]:
    return tuple(exps.get(d, 0) for d in _DIMS)


_ONE = _d()
F = Fraction

# Base units of UCUM (g is the mass base, as in UCUM).
_ATOMS: dict[str, tuple[Fraction, tuple[int, ...], bool]] = {
    # code: (factor to base, dims, metric i.e. accepts prefixes)
    "m": (F(1), _d(L=1), True),
    "s": (F(1), _d(T=1), True),
    "g": (F(1), _d(M=1), True),
    "rad": (F(1), _d(A=1), True),
    "K": (F(1), _d(C=1), True),
    "C": (F(1), _d(Q=1), True),
    "cd": (F(1), _d(F=1), True),
    "mol": (F(1), _d(N=1), True),
    # dimensionless
    "1": (F(1), _ONE, False),
    "%": (F(1, 100), _ONE, False),
    "[ppm]": (F(1, 10**6), _ONE, False),
    "10*": (F(10), _ONE, False),
    "10^": (F(10), _ONE, False),
    # volume, area, length
    "L": (F(1, 1000), _d(L=3), True),
    "l": (F(1, 1000), _d(L=3), True),
    "ar": (F(100), _d(L=2), True),
    "[in_i]": (F(254, 10000), _d(L=1), False),
    "[ft_i]": (F(3048, 10000), _d(L=1), False),
    # time (UCUM: mo = a_j/12, a = a_j = 365.25 d)
    "min": (F(60), _d(T=1), False),
    "h": (F(3600), _d(T=1), False),
    "d": (F(86400), _d(T=1), False),
    "wk": (F(604800), _d(T=1), False),
    "a": (F(86400 * 36525, 100), _d(T=1), False),
    "mo": (F(86400 * 36525, 1200), _d(T=1), False),
    "Hz": (F(1), _d(T=-1), True),
    # mass (avoirdupois; the international pound is exactly 0.45359237 kg)
    "[lb_av]": (F(45359237, 100000), _d(M=1), False),
    "[oz_av]": (F(45359237, 1600000), _d(M=1), False),
    "t": (F(10**6), _d(M=1), True),
    # force, pressure, energy (m[Hg] = 133.3220 kPa exactly in UCUM)
    "N": (F(1000), _d(M=1, L=1, T=-2), True),
    "Pa": (F(1000), _d(M=1, L=-1, T=-2), True),
    "bar": (F(10**8), _d(M=1, L=-1, T=-2), True),
    "m[Hg]": (F(1333220) * 100, _d(M=1, L=-1, T=-2), True),
    "J": (F(1000), _d(M=1, L=2, T=-2), True),
    "cal": (F(41840, 10), _d(M=1, L=2, T=-2), True),
    "W": (F(1000), _d(M=1, L=2, T=-3), True),
    # amount / activity (U = umol/min)
    "U": (F(1, 10**6 * 60), _d(N=1, T=-1), True),
    "kat": (F(1), _d(N=1, T=-1), True),
    # temperature: Kelvin-sized units; the special ones get an offset below
    "Cel": (F(1), _d(C=1), False),
    "[degF]": (F(5, 9), _d(C=1), False),
}

# Special (non-ratio) units: base kelvin = factor * (value + offset)
_SPECIAL = {"Cel": F(27315, 100), "[degF]": F(45967, 100)}

_PREFIXES: dict[str, Fraction] = {
    "Y": F(10) ** 24, "Z": F(10) ** 21, "E": F(10) ** 18, "P": F(10) ** 15, "T": F(10) ** 12,
    "G": F(10) ** 9, "M": F(10) ** 6, "k": F(10) ** 3, "h": F(10) ** 2, "da": F(10),
    "d": F(1, 10), "c": F(1, 100), "m": F(1, 1000), "u": F(1, 10**6), "n": F(1, 10**9),
    "p": F(1, 10**12), "f": F(1, 10**15), "a": F(1, 10**18), "z": F(1, 10**21), "y": F(1, 10**24),
}

_EXPONENT = re.compile(r"^(.*?)([+-]?\d+)$")
_INTEGER = re.compile(r"^\d+$")

#: Bounds on what a unit code may ask of the parser. Real UCUM codes are short (the longest in
#: LOINC's unit list is under 40 characters), exponents small and integers few digits; without
#: bounds, ``10*20000000`` alone made an exact 20-million-digit fraction and held the server.
MAX_CODE_LENGTH = 128
MAX_EXPONENT = 24
MAX_INTEGER_DIGITS = 18
MAX_NESTING = 8


def _atom(symbol: str, whole: str) -> tuple[Fraction, tuple[int, ...], str | None]:
    """Resolve ``prefix? atom``; exact atoms win over prefix splits (``cd`` is candela, ``Pa`` pascal)."""
    if symbol in _ATOMS:
        factor, dims, _ = _ATOMS[symbol]
        return factor, dims, symbol
    for plen in (2, 1):
        prefix, rest = symbol[:plen], symbol[plen:]
        if prefix in _PREFIXES and rest in _ATOMS:
            factor, dims, metric = _ATOMS[rest]
            if not metric:
                raise UcumError(f"'{rest}' in unit '{whole}' is not a metric unit and takes no prefix '{prefix}'")
            return _PREFIXES[prefix] * factor, dims, rest
    raise UcumError(f"unknown UCUM unit symbol '{symbol}' in '{whole}'")


def _split_top(expr: str) -> list[tuple[str, str]]:
    """Split at top-level '.' and '/' (not inside [], {} or ()); return (operator, component)."""
    out: list[tuple[str, str]] = []
    depth = {"[": 0, "{": 0, "(": 0}
    closers = {"]": "[", "}": "{", ")": "("}
    op, start = ".", 0
    if expr.startswith("/"):
        op, start = "/", 1
    for i, ch in enumerate(expr):
        if i < start:
            continue
        if ch in depth:
            depth[ch] += 1
        elif ch in closers:
            depth[closers[ch]] -= 1
            if depth[closers[ch]] < 0:
                raise UcumError(f"unbalanced '{ch}' in unit '{expr}'")
        elif ch in "./" and not any(depth.values()):
            out.append((op, expr[start:i]))
            op, start = ch, i + 1
    if any(depth.values()):
        raise UcumError(f"unbalanced brackets in unit '{expr}'")
    out.append((op, expr[start:]))
    return out


def _component(comp: str, whole: str) -> tuple[Fraction, tuple[int, ...], list[str]]:
    if not comp:
        raise UcumError(f"empty term in unit '{whole}'")
    # annotations ({1.73_m2}, {score}) carry no meaning for conversion: they are unity
    body = re.sub(r"\{[^{}]*\}", "", comp)
    if not body:
        return F(1), _ONE, []
    if body.startswith("(") and body.endswith(")"):
        return _term(body[1:-1], whole)
    if _INTEGER.match(body):
        if len(body) > MAX_INTEGER_DIGITS:
            raise UcumError(f"the integer factor in unit '{whole[:60]}' has more than {MAX_INTEGER_DIGITS} digits")
        return F(int(body)), _ONE, []
    exp = 1
    m = _EXPONENT.match(body)
    if m and m.group(1) and not body.endswith("]"):
        digits = m.group(2).lstrip("+-")
        if len(digits) > 3 or int(digits) > MAX_EXPONENT:
            raise UcumError(f"the exponent {m.group(2)[:10]} in unit '{whole[:60]}' is beyond +-{MAX_EXPONENT}")
        base, exp = m.group(1), int(m.group(2))
        if base in ("10*", "10^"):
            return F(10) ** exp, _ONE, []
    else:
        base = body
    factor, dims, atom = _atom(base, whole)
    return factor ** exp, tuple(d * exp for d in dims), [atom] if atom else []


def _term(expr: str, whole: str) -> tuple[Fraction, tuple[int, ...], list[str]]:
    factor, dims, atoms = F(1), _ONE, []
    for op, comp in _split_top(expr):
        f, d, a = _component(comp, whole)
        atoms += a
        if op == ".":
            factor, dims = factor * f, tuple(x + y for x, y in zip(dims, d))
        else:
            factor, dims = factor / f, tuple(x - y for x, y in zip(dims, d))
    return factor, dims, atoms


@lru_cache(maxsize=4096)
def parse(code: str) -> Unit:
    """Parse a UCUM unit code (case-sensitive form) into a :class:`Unit`.

    Parameters
    ----------
    code : str
        A UCUM expression such as ``mg/dL``, ``mmol/L``, ``[lb_av]``, ``mL/min/{1.73_m2}``.

    Raises
    ------
    UcumError
        If the expression is not valid in the supported subset.

    Examples
    --------
    >>> parse("[lb_av]").factor   # grams per pound, exactly
    Fraction(45359237, 100000)
    """
    if not isinstance(code, str) or not code or code != code.strip() or " " in code:
        raise UcumError(f"'{str(code)[:60]}' is not a UCUM unit code (empty or contains spaces)")
    if len(code) > MAX_CODE_LENGTH:
        raise UcumError(f"unit code '{code[:60]}...' is longer than {MAX_CODE_LENGTH} characters")
    depth = deepest = 0
    for ch in code:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise UcumError(f"unit code '{code[:60]}' nests parentheses deeper than {MAX_NESTING}")
    factor, dims, atoms = _term(code, code)
    special = [a for a in atoms if a in _SPECIAL]
    if special:
        if code not in _SPECIAL:
            raise UcumError(f"the special unit '{special[0]}' cannot be combined with other units in '{code}'")
        return Unit(code, factor, dims, _SPECIAL[code])
    return Unit(code, factor, dims)


def is_valid(code: str) -> bool:
    """True if ``code`` parses as a UCUM expression of the supported subset."""
    try:
        parse(code)
    except UcumError:
        return False
    return True


_MASS = _d(M=1)
_AMOUNT = _d(N=1)


def conversion(from_unit: str, to_unit: str, *, molar_mass: float | Fraction | str | None = None
               ) -> tuple[Fraction, Fraction, Fraction]:
    """The exact affine map ``to = (value + pre) * factor - post`` between two units.

    Returned as ``(pre_offset, factor, post_offset)``; both offsets are zero for ratio units.
    ``molar_mass`` (g/mol) bridges mass and amount of substance (mg/dL <-> mmol/L).
    """
    src, dst = parse(from_unit), parse(to_unit)
    factor = src.factor / dst.factor
    if src.dims != dst.dims:
        delta = tuple(a - b for a, b in zip(src.dims, dst.dims))
        mm = Fraction(str(molar_mass)) if molar_mass is not None else None
        if mm is not None and mm > 0 and delta == tuple(a - b for a, b in zip(_MASS, _AMOUNT)):
            factor = factor / mm  # mass -> amount: divide by g/mol
        elif mm is not None and mm > 0 and delta == tuple(a - b for a, b in zip(_AMOUNT, _MASS)):
            factor = factor * mm
        else:
            hint = "" if molar_mass is not None else " (mass <-> amount of substance needs a molar mass)"
            raise UcumError(
                f"cannot convert '{from_unit}' [{src.describe_dims()}] to '{to_unit}' "
                f"[{dst.describe_dims()}]: the units are not commensurable{hint}")
    return src.offset, factor, dst.offset


def exact_decimal(value) -> Fraction:
    """The exact rational a JSON number stands for: a float is read as its shortest decimal
    repr (5.3 means 53/10, not the nearest binary double), so conversions are exact on the decimal."""
    if isinstance(value, bool):
        raise UcumError("a boolean is not a quantity value")
    try:
        if isinstance(value, float):
            return Fraction(repr(value))
        if isinstance(value, str):
            text = value.strip()
            if len(text) > 64:
                raise UcumError(f"the quantity value '{text[:30]}...' has more than 64 characters")
            from decimal import Decimal, InvalidOperation

            try:
                exponent = Decimal(text).as_tuple().exponent
            except InvalidOperation:
                raise UcumError(f"{text!r} is not a decimal number") from None
            if not isinstance(exponent, int) or abs(exponent) > 400:  # 1e999999999 would be a billion digits
                raise UcumError(f"{text!r} is not a finite decimal number within +-1e400")
            return Fraction(text)
        return Fraction(value)
    except (ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, UcumError):
            raise
        raise UcumError(f"{value!r} is not a finite decimal number") from None


def convert(value, from_unit: str, to_unit: str, *, molar_mass=None) -> float:
    """Convert ``value`` from one UCUM unit to another, exactly to the defined factors.

    Parameters
    ----------
    value : int, float, str, Decimal or Fraction
        The quantity in ``from_unit``; a str/Decimal keeps its decimal digits exact.
    from_unit, to_unit : str
        UCUM codes.
    molar_mass : float or str, optional
        Molar mass in g/mol, required between mass and amount-of-substance units
        (glucose: 180.156).

    Returns
    -------
    float
        The converted value, correctly rounded from the exact rational result.

    Raises
    ------
    UcumError
        Unknown unit, or units that are not commensurable.

    Examples
    --------
    >>> convert(1, "[lb_av]", "kg")
    0.45359237
    >>> convert(100, "[degF]", "Cel")
    37.77777777777778
    """
    pre, factor, post = conversion(from_unit, to_unit, molar_mass=molar_mass)
    exact = exact_decimal(value)
    # to_base = f_src * (v + pre_src); result = to_base / f_dst - pre_dst
    try:
        return float((exact + pre) * factor - post)
    except OverflowError:
        raise UcumError(f"{value!r} {from_unit} in {to_unit} is beyond the range of a decimal number") from None


__all__ = ["UCUM_SYSTEM", "Unit", "UcumError", "parse", "is_valid", "conversion", "convert", "exact_decimal"]
