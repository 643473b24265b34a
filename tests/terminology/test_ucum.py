"""UCUM parsing and conversion: exact factors against hand-computed values, clear refusals."""
from __future__ import annotations

from fractions import Fraction

import pytest

from terminology import ucum

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value, src, dst, expected", [
    # glucose, molar mass 180.156 g/mol: 1 mmol/L = 180.156 mg/L = 18.0156 mg/dL
    ("5.5", "mmol/L", "mg/dL", Fraction("99.0858")),          # 5.5 * 18.0156
    ("100", "mg/dL", "mmol/L", Fraction(1000) / Fraction("180.156")),  # 100 mg/dL = 1000 mg/L
    ("126", "mg/dL", "mmol/L", Fraction(1260) / Fraction("180.156")),  # = 6.99393... (ADA threshold 7.0)
    # international avoirdupois pound = 0.45359237 kg exactly
    ("150", "[lb_av]", "kg", Fraction("68.0388555")),
    ("1", "kg", "[lb_av]", Fraction(100000000, 45359237)),
    ("16", "[oz_av]", "[lb_av]", Fraction(1)),
    # temperature: F = C * 9/5 + 32
    ("98.6", "[degF]", "Cel", Fraction(37)),
    ("-40", "Cel", "[degF]", Fraction(-40)),
    ("0", "Cel", "K", Fraction("273.15")),
    ("212", "[degF]", "K", Fraction("373.15")),
    # mm[Hg] is 133.322 Pa (UCUM: m[Hg] = 133.3220 kPa)
    ("120", "mm[Hg]", "kPa", Fraction("15.99864")),
    ("72", "/min", "/h", Fraction(4320)),
    ("1", "L", "mL", Fraction(1000)),
    ("1", "dL", "mL", Fraction(100)),
    ("6.5", "%", "1", Fraction("0.065")),
    ("90", "mL/min/{1.73_m2}", "L/h/{1.73_m2}", Fraction("5.4")),
    ("5", "10*3/uL", "10*9/L", Fraction(5)),
    ("1", "a", "d", Fraction("365.25")),
    ("12", "[in_i]", "[ft_i]", Fraction(1)),
])
def test_conversion_is_exact_to_the_defined_factor(value, src, dst, expected):
    assert ucum.convert(value, src, dst, molar_mass="180.156") == float(expected)


def test_float_input_is_read_as_its_decimal():
    # 5.3 mmol/L must give 5.3 * 18.0156 = 95.48268 exactly (not the binary neighbour's product)
    assert ucum.convert(5.3, "mmol/L", "mg/dL", molar_mass=180.156) == 95.48268
    assert ucum.convert(5.3, "mmol/L", "mg/dL", molar_mass=180.156) == float(Fraction("95.48268"))


def test_round_trip_is_identity():
    for v in (0.1, 4.2, 37.5, 250.0):
        there = ucum.convert(v, "[degF]", "Cel")
        assert ucum.convert(there, "Cel", "[degF]") == pytest.approx(v, rel=1e-15)


@pytest.mark.parametrize("src, dst, words", [
    ("mg/dL", "kg", "not commensurable"),
    ("mmol/L", "mg/dL", "needs a molar mass"),
    ("kg", "Cel", "not commensurable"),
    ("/min", "mm[Hg]", "not commensurable"),
])
def test_incompatible_units_are_refused_clearly(src, dst, words):
    with pytest.raises(ucum.UcumError) as info:
        ucum.convert(1, src, dst)
    assert words in str(info.value) and src in str(info.value) and dst in str(info.value)


@pytest.mark.parametrize("bad", ["", "mg /dL", "foo", "kg/", "[lb_av", "Cel/h", "k[lb_av]", "mg//dL"])
def test_invalid_unit_codes_are_refused(bad):
    assert not ucum.is_valid(bad)
    with pytest.raises(ucum.UcumError):
        ucum.parse(bad)


def test_atoms_win_over_prefix_splits():
    assert ucum.parse("cd").dims == ucum.parse("cd").dims and ucum.parse("cd").factor == 1  # candela, not centi-day
    assert ucum.parse("Pa").factor == 1000  # pascal, not peta-year
    assert ucum.parse("mm[Hg]").factor == Fraction(133322)


def test_annotations_are_unity():
    assert ucum.parse("mL/min/{1.73_m2}").factor == ucum.parse("mL/min").factor
    assert ucum.parse("{score}").factor == 1 and ucum.parse("{score}").dims == ucum.parse("1").dims
