"""Loading a licensed release over the shipped subset: LOINC's table format and CodeSystem JSON."""
from __future__ import annotations

import pytest

from terminology import catalog
from terminology.codesystem import lookup
from terminology.release import load_release

pytestmark = pytest.mark.unit

# the column layout of LoincTable/Loinc.csv (a few of its columns, in release order)
LOINC_TABLE = ('"LOINC_NUM","COMPONENT","PROPERTY","LONG_COMMON_NAME","SHORTNAME","STATUS","EXAMPLE_UCUM_UNITS"\n'
               '"2339-0","Glucose","MCnc","Glucose [Mass/volume] in Blood","Glucose Bld-mCnc","ACTIVE","mg/dL"\n'
               '"4548-4","Hemoglobin A1c/Hemoglobin.total","MFr","Hemoglobin A1c/Hemoglobin.total in Blood",'
               '"Hgb A1c MFr Bld","ACTIVE","%"\n')


def test_loinc_table_replaces_the_subset(tmp_path, monkeypatch):
    table = tmp_path / "Loinc.csv"
    table.write_text(LOINC_TABLE)
    monkeypatch.setenv("TRIALTWIN_TERMINOLOGY_DIR", str(tmp_path / "term"))
    with pytest.raises(Exception):
        lookup(system=catalog.LOINC, code="2339-0")
    load_release(table, loinc_version="2.77-test")
    try:
        fresh = catalog.reload_catalog()
        out = lookup(fresh, system=catalog.LOINC, code="2339-0")
        assert out["parameter"][1] == {"name": "version", "valueString": "2.77-test"}
        assert out["parameter"][2] == {"name": "display", "valueString": "Glucose [Mass/volume] in Blood"}
        assert fresh.property_value(catalog.LOINC, "2339-0", "canonical-unit") == "mg/dL"
        assert fresh.code_system(catalog.LOINC).resource["content"] == "complete"
    finally:
        monkeypatch.delenv("TRIALTWIN_TERMINOLOGY_DIR")
        catalog.reload_catalog()
    assert catalog.default_catalog().code_system(catalog.LOINC).resource["content"] == "fragment"


def test_code_system_without_concepts_is_refused(tmp_path):
    path = tmp_path / "cs.json"
    path.write_text('{"resourceType": "CodeSystem", "url": "http://snomed.info/sct", "content": "not-present", "status": "active"}')
    with pytest.raises(Exception) as info:
        load_release(path, folder=tmp_path / "term")
    assert "no concepts" in str(info.value)
