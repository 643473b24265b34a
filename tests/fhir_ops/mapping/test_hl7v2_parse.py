"""The HL7 v2 field reader against python-hl7's full parse: the same value for every field, component,
subcomponent and repetition of real-looking messages, with default and with unusual separators."""
from __future__ import annotations

import hl7
import pytest

from fhir_ops.mapping import hl7v2
from fhir_ops.mapping.hl7v2 import _get, _repeats
from tests.fhir_ops.connectors.hl7_messages import adt, good_oru, obx, oru

pytestmark = pytest.mark.unit

MESSAGES = [
    good_oru("C1", "TT201-001"),
    adt("C2", "TT201-002", family="O'Brien", given="Ann Marie"),
    oru("C3", "TT201-003", obx(1, "LAB-HBA1C", "7.4", "%^percent^UCUM"), obx(2, "NOTE", "a\\F\\b", "", vtype="ST")),
    # repetitions (two identifiers), subcomponents in the assigning authority, empty trailing fields
    "\r".join(["MSH|^~\\&|LAB|CENTRAL|TT|TT|20261120||ORU^R01^ORU_R01|C4|P|2.5.1|||",
               "PID|1||A1^^^TT201~B2^^^HOSP&urn:oid:1.2.3&ISO||Doe^Jane^Q^^Dr||19610412|F",
               "OBR|1||O1|PANEL^Panel^99TTLAB|||20261120090000", "OBX|1|NM|LAB-FPG^^99TTLAB||7.2|mmol/L^^UCUM|||||F"]),
    # other separators: field '#', component ':', repetition '*', escape '!', subcomponent '@'
    "\r".join(["MSH#:*!@#LAB#CENTRAL#TT#TT#20261120##ORU:R01:ORU_R01#C5#P#2.5.1",
               "PID#1##A1:::TT201*B2:::HOSP@urn:oid:1.2.3@ISO##Doe:Jane",
               "OBX#1#NM#LAB-FPG::99TTLAB##7.2#mmol/L::UCUM#####F"]),
]


@pytest.mark.parametrize("text", MESSAGES, ids=[f"m{i}" for i in range(len(MESSAGES))])
def test_every_value_read_is_the_one_python_hl7_reads(text):
    ours, ref = hl7v2.parse(text), hl7.parse(text)
    assert [s[0] for s in ours] == [str(s[0]) for s in ref]
    checked = 0
    for seg_no, (seg, ref_seg) in enumerate(zip(ours, ref)):
        name = seg[0]
        assert len(seg) == len(ref_seg)
        for field in range(3 if name == "MSH" else 1, len(seg)):
            value = ref_seg[field]
            reps = value if value and isinstance(value[0], hl7.Repetition) else [value]
            if str(value):
                assert _repeats(seg, field) == len(reps)
            for r, rep in enumerate(reps, 1):
                comps = rep if isinstance(rep, list) else [rep]
                for c, comp in enumerate(comps, 1):
                    subs = comp if isinstance(comp, list) else [comp]
                    for k, sub in enumerate(subs, 1):
                        assert _get(seg, field, c, k, r) == str(sub), (name, field, r, c, k)
                        checked += 1
                assert _get(seg, field, len(comps) + 1, 1, r) == ""
            assert _get(seg, field, 1, 1, len(reps) + 1) == ""
        assert _get(seg, len(seg) + 3) == ""
    assert checked > 20
    msh = ours.segment("MSH")
    assert (_get(msh, 9, 1), _get(msh, 9, 2), _get(msh, 10)) == (
        ref.extract_field("MSH", 1, 9, 1, 1), ref.extract_field("MSH", 1, 9, 1, 2), ref.extract_field("MSH", 1, 10))


def test_a_message_without_an_msh_or_with_a_cut_header_is_rejected():
    for text in ("PID|1||A1", "MSH", ""):
        with pytest.raises(hl7v2.Hl7Fault) as err:
            hl7v2.parse(text)
        assert err.value.ack_code == "AR"


@pytest.mark.parametrize("text", ["plain", "", "a|b^c&d~e\\f", "\\F\\ already escaped", "OBX^2^6 | 5.5 mmol/L & more"])
def test_ack_escapes_delimiters_as_python_hl7_does(text):
    # the ACK's one-pass escape against python-hl7's escape for the default delimiters
    msh = hl7.parse("MSH|^~\\&|A|B\r")
    assert hl7v2._escape(text) == hl7.util.escape(msh, text)
    fault = hl7v2.Hl7Fault(text or "x", segment="OBX", sequence=2, field=6, condition=hl7v2.DATA_TYPE_ERROR)
    ack = hl7v2.ack(hl7v2.parse(good_oru("E1", "TT201-001")), "AE", "id-1", fault)
    err = hl7.parse(ack.replace("\n", "\r")).segment("ERR")
    assert str(err(2)) == "OBX^2^6" and hl7.util.unescape(hl7.parse(ack), str(err(8))) == (text or "x")


def test_ack_turns_segment_ends_into_spaces():
    assert hl7v2._escape("line one\rline two\n") == "line one line two "
