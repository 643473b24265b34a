"""The mapping CSV layout: every problem reported with its physical line; nothing returned on error."""
from __future__ import annotations

import pytest

from fhir_ops.errors import InvalidRequest
from terminology.mapfile import COLUMNS, check_concept_map, parse_csv

pytestmark = pytest.mark.unit
URL = "https://trialtwin.org/fhir/ConceptMap/test"
SRC = "https://example.org/lab"
HEADER = "source_system,source_code,target_system,target_code,equivalence\n"


def lines_of(text, **kw):
    with pytest.raises(InvalidRequest) as info:
        parse_csv(text, url=kw.get("url", URL), version=kw.get("version", "1"))
    assert info.value.status == 400 and "nothing was stored" in info.value.message
    return [(i["expression"][0], i["diagnostics"]) for i in info.value.to_outcome()["issue"][1:]]


def test_valid_csv_groups_rows_into_a_draft():
    text = "\ufeff" + ",".join(COLUMNS) + "\n" + (
        f"{SRC},G1,Glucose,http://loinc.org,2345-7,Glucose [Mass/volume] in Serum or Plasma,equivalent,\n"
        "\n"
        f"{SRC},G1,Glucose,http://loinc.org,1558-6,,narrower,\"fasting, when flagged\"\n"
        f"{SRC},X9,Unknown,http://loinc.org,,,unmatched,\n")
    cm = parse_csv(text, url=URL, version="1.2")
    assert cm["status"] == "draft" and cm["version"] == "1.2"
    (group,) = cm["group"]
    assert [e["code"] for e in group["element"]] == ["G1", "X9"]
    assert group["element"][0]["target"][1] == {"code": "1558-6", "equivalence": "narrower", "comment": "fasting, when flagged"}
    assert group["element"][1]["target"] == [{"equivalence": "unmatched"}]
    from fhir.resources.R4B.conceptmap import ConceptMap

    ConceptMap.model_validate(cm)


def test_line_numbers_count_physical_lines_including_quoted_newlines():
    text = HEADER + (f"{SRC},A,http://loinc.org,2345-7,equivalent\n"
                     f"{SRC},B,http://loinc.org,2345-7,\"equi\nvalent\"\n"   # lines 3-4
                     f"{SRC},C,http://loinc.org,2345-8,equivalent\n")         # line 5: bad check digit
    got = lines_of(text)
    assert [g[0] for g in got] == ["line[3]", "line[5]"]
    assert "2345-8" in got[1][1]


def test_every_kind_of_row_problem():
    text = HEADER + (f"{SRC},A,http://loinc.org,2345-7,equivalent\n"
                     f"{SRC},A,http://loinc.org,2345-7,equivalent\n"          # 3 duplicate
                     f"lab,B,http://loinc.org,2345-7,equivalent\n"            # 4 relative system
                     f"{SRC},C,http://loinc.org,2345-7,unmatched\n"           # 5 unmatched with target
                     f"{SRC},D,http://snomed.info/sct,25064003,equivalent\n"  # 6 bad Verhoeff
                     f"{SRC},E,http://loinc.org\n"                             # 7 too few fields
                     f",F,http://loinc.org,2345-7,equivalent\n")              # 8 empty source_system
    got = lines_of(text)
    assert [g[0] for g in got] == [f"line[{n}]" for n in (3, 4, 5, 6, 7, 8)]
    assert "repeats the mapping of line 2" in got[0][1]
    assert "absolute URI" in got[1][1] and "empty target_code" in got[2][1]
    assert "SNOMED CT identifier" in got[3][1] and "5 field" not in got[4][1] and "3 field(s)" in got[4][1]
    assert "'source_system' is empty" in got[5][1]


def test_header_and_map_identity_problems():
    assert lines_of("source_code,target_code\nA,B\n")[0][0] == "line[1]"
    got = lines_of(HEADER.replace("equivalence", "equivalance") + f"{SRC},A,http://loinc.org,2345-7,x\n")
    assert "unknown column(s) equivalance" in got[0][1]
    got = lines_of(HEADER + f"{SRC},A,http://loinc.org,2345-7,equivalent\n", url="not a url", version="")
    assert {g[0] for g in got} == {"ConceptMap.url", "ConceptMap.version"}
    assert lines_of(HEADER)[0][0] == "line[2]"  # header only: no rows


def test_concept_map_json_checks_point_at_elements():
    cm = {"resourceType": "ConceptMap", "url": URL, "version": "1", "status": "active", "group": [
        {"source": SRC, "target": "http://loinc.org", "element": [
            {"code": "A", "target": [{"code": "2345-7", "equivalence": "equivalent"}]},
            {"code": "B", "target": [{"code": "2345-7", "equivalence": "bogus"}]}]}]}
    with pytest.raises(InvalidRequest) as info:
        check_concept_map(cm)
    exprs = [i.get("expression") for i in info.value.to_outcome()["issue"][1:]]
    assert ["ConceptMap.group[0].element[1].target[0]"] in exprs
    cm["group"][0]["element"][1]["target"][0]["equivalence"] = "wider"
    assert check_concept_map(cm)["status"] == "draft"
