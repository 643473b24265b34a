"""The runnable examples in the terminology modules' docstrings (not collected by default: testpaths)."""
from __future__ import annotations

import doctest
import importlib

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("module", ["terminology.ucum", "terminology.checkdigits", "terminology.conceptmap"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
