#!/usr/bin/env python3
"""Load TrialTwin's conformance resources into HAPI FHIR and validate example resources against them.

Every StructureDefinition, OperationDefinition and SearchParameter (and the CodeSystems and ValueSets
they bind to) found under the given folders is PUT by id into a running HAPI (scripts/hapi.sh start)
and validated itself (HAPI builds each profile's snapshot, which catches differentials naming elements
that do not exist); each example resource (``examples/*.json``, naming its profile in
``meta.profile``) is then checked with ``POST [type]/$validate?profile=<url>``.
Any load failure or any ``error``/``fatal`` issue fails the run.

Usage: python scripts/hapi_validate.py [--base URL] [--conformance DIR ...] [--examples DIR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
# Loaded in this order: code systems before the value sets that include them, and both before the
# profiles that bind to them, so HAPI can check bindings and build snapshots at upload time.
CONFORMANCE_TYPES = ("CodeSystem", "ValueSet", "SearchParameter", "StructureDefinition", "OperationDefinition")
FHIR_JSON = "application/fhir+json"


@dataclass
class Report:
    """What was loaded and validated, and every problem found (empty ``problems`` means success)."""

    loaded: list[str] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _json_files(folder: Path, *, recursive: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    pattern = "**/*.json" if recursive else "*.json"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def find_conformance(folders: list[Path], skip: tuple[str, ...] = ("examples",)) -> list[tuple[Path, dict]]:
    """Return (file, resource) for each conformance resource under ``folders`` (examples excluded)."""
    found = []
    for folder in folders:
        for path in _json_files(folder, recursive=True):
            if any(part in skip for part in path.relative_to(folder).parts[:-1]):
                continue
            resource = json.loads(path.read_text())
            if isinstance(resource, dict) and resource.get("resourceType") in CONFORMANCE_TYPES:
                found.append((path, resource))
    return sorted(found, key=lambda item: CONFORMANCE_TYPES.index(item[1]["resourceType"]))


def find_examples(folders: list[Path]) -> list[tuple[Path, dict]]:
    """Return (file, resource) for each example resource directly in ``folders``."""
    return [(p, json.loads(p.read_text())) for folder in folders for p in _json_files(folder, recursive=False)]


def _issues(outcome: dict, severities=("error", "fatal")) -> list[str]:
    out = []
    for issue in outcome.get("issue", []) if isinstance(outcome, dict) else []:
        if issue.get("severity") in severities:
            where = ", ".join(issue.get("expression") or issue.get("location") or [])
            out.append(f"{issue.get('severity')}: {issue.get('diagnostics', '')}" + (f" @ {where}" if where else ""))
    return out


# HAPI answers 409 HAPI-0825 when its create of a client-assigned id collides with another transaction
# (its maintainers' remedy is to retry); a second and third try with a pause, then it is a real problem.
_ID_RACE = "HAPI-0825"
RETRIES = 3


def _put(session: requests.Session, url: str, resource: dict) -> requests.Response:
    for attempt in range(RETRIES):
        answer = session.put(url, json=resource, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
                             timeout=120)
        if answer.status_code != 409 or _ID_RACE not in answer.text or attempt == RETRIES - 1:
            return answer
        time.sleep(1.0 + attempt)
    return answer


def load(base_url: str, resources: list[tuple[Path, dict]], report: Report, session: requests.Session) -> None:
    """PUT each conformance resource by id; a missing id or any non-2xx answer is a problem."""
    for path, resource in resources:
        rtype, rid = resource["resourceType"], resource.get("id")
        if not rid:
            report.problems.append(f"{path}: {rtype} has no id, so it cannot be loaded by PUT")
            continue
        answer = _put(session, f"{base_url}/{rtype}/{rid}", resource)
        if answer.status_code >= 300:
            try:
                detail = "; ".join(_issues(answer.json())) or answer.text[:300]
            except ValueError:
                detail = answer.text[:300]
            report.problems.append(f"{path}: loading {rtype}/{rid} failed ({answer.status_code}): {detail}")
        else:
            report.loaded.append(f"{rtype}/{rid}")
    # Accepting a PUT proves little (HAPI stores a differential naming elements that do not exist);
    # validating each definition makes the validator build its snapshot and check every path.
    for path, resource in resources:
        if f"{resource['resourceType']}/{resource.get('id')}" not in report.loaded:
            continue
        answer = session.post(f"{base_url}/{resource['resourceType']}/$validate", json=resource,
                              headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=120)
        try:
            issues = _issues(answer.json())
        except ValueError:
            issues = [f"$validate answered {answer.status_code} without JSON"]
        if any(_PACKAGE_QUIRK in i for i in issues) and _snapshot_builds(base_url, resource, session):
            issues = [i for i in issues if _PACKAGE_QUIRK not in i]
        report.problems.extend(f"{path}: {issue}" for issue in issues)


# HAPI 8.8.0's validator reports this when it validates an Extension definition itself, although the
# same definition snapshots and validates extensions correctly; it is dropped only when the
# definition's $snapshot really builds.
_PACKAGE_QUIRK = "Unable to resolve package id hl7.fhir.r4.core#null"


def _snapshot_builds(base_url: str, resource: dict, session: requests.Session) -> bool:
    if resource.get("resourceType") != "StructureDefinition":
        return False
    answer = session.get(f"{base_url}/StructureDefinition/{resource['id']}/$snapshot",
                         headers={"Accept": FHIR_JSON}, timeout=120)
    return answer.status_code == 200 and bool(answer.json().get("snapshot", {}).get("element"))


def validate(base_url: str, examples: list[tuple[Path, dict]], report: Report,
             session: requests.Session) -> dict[Path, dict]:
    """``$validate`` each example against every profile in its ``meta.profile``; return the outcomes."""
    outcomes: dict[Path, dict] = {}
    for path, resource in examples:
        profiles = (resource.get("meta") or {}).get("profile") or []
        if not profiles:
            report.problems.append(f"{path}: example names no profile in meta.profile")
            continue
        for profile in profiles:
            answer = session.post(f"{base_url}/{resource['resourceType']}/$validate",
                                  params={"profile": profile}, json=resource,
                                  headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=120)
            try:
                outcome = answer.json()
            except ValueError:
                report.problems.append(f"{path}: $validate answered {answer.status_code} without JSON")
                continue
            outcomes[path] = outcome
            issues = _issues(outcome)
            if answer.status_code >= 300 and not issues:
                issues = [f"$validate answered {answer.status_code}"]
            report.problems.extend(f"{path} against {profile}: {i}" for i in issues)
            report.validated.append(f"{path.name} against {profile}")
    return outcomes


def run(base_url: str, conformance_dirs: list[Path], example_dirs: list[Path]) -> Report:
    """Load every conformance resource, then validate every example; return the report."""
    report = Report()
    with requests.Session() as session:
        load(base_url, find_conformance(conformance_dirs), report, session)
        if report.ok:  # validating against half-loaded profiles would only add noise
            validate(base_url, find_examples(example_dirs), report, session)
    return report


def main(argv: list[str] | None = None) -> int:
    default_base = os.environ.get("TRIALTWIN_HAPI_URL") or f"http://127.0.0.1:{os.environ.get('HAPI_PORT', '8090')}/fhir"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=default_base, help="HAPI FHIR base URL (default %(default)s)")
    parser.add_argument("--conformance", nargs="*", type=Path, default=[ROOT / "profiles"])
    parser.add_argument("--examples", nargs="*", type=Path, default=[ROOT / "profiles" / "examples"])
    args = parser.parse_args(argv)
    report = run(args.base.rstrip("/"), args.conformance, args.examples)
    print(f"loaded {len(report.loaded)} conformance resources, validated {len(report.validated)} examples")
    for problem in report.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
