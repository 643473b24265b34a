"""HL7 v2.5.1 test messages as a lab and a registration system would send them."""
from __future__ import annotations

SUBJECT_AUTHORITY = "TT201"


def msh(kind: str, control_id: str, facility: str = "CENTRAL-LAB") -> str:
    return f"MSH|^~\\&|LABSYS|{facility}|TRIALTWIN|TT|20261120103000||{kind}|{control_id}|P|2.5.1"


def adt(control_id: str, subject: str, family: str = "Doe", given: str = "Jane", event: str = "A04",
        birth: str = "19610412", sex: str = "F") -> str:
    return "\r".join([msh(f"ADT^{event}^ADT_A01", control_id, "REG"),
                      f"EVN|{event}|20261120103000",
                      f"PID|1||{subject}^^^{SUBJECT_AUTHORITY}||{family}^{given}||{birth}|{sex}",
                      "PV1|1|O"])


def obx(set_id: int, code: str, value: str, unit: str, *, system: str = "99TTLAB", vtype: str = "NM",
        status: str = "F", when: str = "20261120090000") -> str:
    return f"OBX|{set_id}|{vtype}|{code}^^{system}||{value}|{unit}|||||{status}|||{when}"


def oru(control_id: str, subject: str, *results: str) -> str:
    return "\r".join([msh("ORU^R01^ORU_R01", control_id),
                      f"PID|1||{subject}^^^{SUBJECT_AUTHORITY}",
                      "OBR|1||ORD-" + control_id + "|LAB-PANEL^Central lab panel^99TTLAB|||20261120090000",
                      *results])


def good_oru(control_id: str, subject: str, hba1c: str = "7.4", fpg_mmol: str = "7.2") -> str:
    return oru(control_id, subject, obx(1, "LAB-HBA1C", hba1c, "%^percent^UCUM"),
               obx(2, "LAB-FPG", fpg_mmol, "mmol/L^^UCUM"))
