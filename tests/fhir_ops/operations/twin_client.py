"""A small FHIR client vocabulary for the twin-operation tests: Parameters bodies, calls, readers."""
from __future__ import annotations

import numpy as np
import requests

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON}


def params(**values) -> dict:
    """A Parameters body; lists repeat a parameter; the value type follows the Python type."""
    out = []
    for name, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            key = ("valueBoolean" if isinstance(v, bool) else "valueInteger" if isinstance(v, int)
                   else "valueDecimal" if isinstance(v, float) else "valueCode")
            out.append({"name": name, key: v})
    return {"resourceType": "Parameters", "parameter": out}


def simulate(base: str, target: str, body: dict | None = None, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{base}/{target}/$simulate", json=body or params(), headers={**HEADERS, **(headers or {})},
                         timeout=120)


def entries(body: dict, name: str) -> list[dict]:
    """Entries of a repeating output parameter with parts, as {part name: value}."""
    rows = []
    for p in body["parameter"]:
        if p["name"] == name:
            rows.append({q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]})
    return rows


def single(body: dict, name: str):
    for p in body["parameter"]:
        if p["name"] == name:
            return next(v for k, v in p.items() if k.startswith("value"))
    return None


def series(body: dict, output: str, key: str = "median") -> np.ndarray:
    return np.array([r[key] for r in entries(body, "forecast") if r["output"] == output])


def issue_text(resp: requests.Response) -> str:
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert resp.headers["Content-Type"].startswith(FHIR_JSON)
    return " ".join(i.get("diagnostics", "") for i in outcome["issue"])


def error_id(resp: requests.Response) -> str:
    return resp.json()["issue"][0]["details"]["coding"][0]["code"]
