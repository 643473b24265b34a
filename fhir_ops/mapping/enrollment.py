"""Read a study's recruitment into per-site counts: who was screened where and when, who was randomized.

A participant's site is the study site (a ``Location`` in ``ResearchStudy.site``) whose
``managingOrganization`` is the ``Patient.managingOrganization``; the screening date is
``ResearchSubject.period.start``; a screen failure is a ResearchSubject with status ``ineligible``
or ``not-registered`` (R4 research-subject-status).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from fhir_ops.errors import NotFound, Unprocessable
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.store.base import Store

SCREEN_FAILURE_STATUSES = ("ineligible", "not-registered")
NOT_YET_SCREENED = ("candidate", "potential-candidate")


def _versioned(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource.get('meta', {}).get('versionId', '1')}"


@dataclass
class Site:
    """One study site: its Location id, display, and the screening dates seen there."""

    location_id: str
    name: str
    organization: str | None
    screened: list[datetime] = field(default_factory=list)
    randomized: list[datetime] = field(default_factory=list)


@dataclass
class Recruitment:
    """A study's recruitment up to its data cut."""

    study: dict
    sites: list[Site]
    unassigned: int
    unassigned_randomized: int
    inputs: list[str]

    @property
    def screened(self) -> int:
        return sum(len(s.screened) for s in self.sites)

    @property
    def randomized(self) -> int:
        """Randomized so far, including participants whose site is unknown (they count toward the target)."""
        return sum(len(s.randomized) for s in self.sites) + self.unassigned_randomized

    @property
    def last_screening(self) -> datetime | None:
        dates = [d for s in self.sites for d in s.screened]
        return max(dates) if dates else None


def load_recruitment(store: Store, study_id: str) -> Recruitment:
    """Sites and per-site screening/randomization dates of ``ResearchStudy/{study_id}``."""
    study = store.read("ResearchStudy", study_id)
    inputs = [_versioned(study)]
    refs = [(s.get("reference") or "") for s in study.get("site", [])]
    locations = [r.split("/", 1)[1] for r in refs if r.startswith("Location/")]
    if not locations:
        raise Unprocessable(f"ResearchStudy/{study_id} lists no sites (ResearchStudy.site): recruitment is "
                            "forecast per site", error_id="no-sites", expression=["ResearchStudy.site"])
    sites: list[Site] = []
    by_org: dict[str, Site] = {}
    for loc_id in dict.fromkeys(locations):
        try:
            loc = store.read("Location", loc_id)
        except NotFound:
            raise Unprocessable(f"ResearchStudy/{study_id} names site Location/{loc_id}, which does not exist",
                                error_id="unknown-site", expression=["ResearchStudy.site"]) from None
        inputs.append(_versioned(loc))
        org = (loc.get("managingOrganization") or {}).get("reference")
        site = Site(loc_id, loc.get("name") or loc_id, org)
        sites.append(site)
        if org:
            by_org[org] = site
    subjects = store.search_all("ResearchSubject", [("study", f"ResearchStudy/{study_id}")])
    if not subjects:
        raise Unprocessable(f"ResearchStudy/{study_id} has no ResearchSubjects yet: there is no recruitment to "
                            "fit", error_id="no-subjects")
    unassigned = unassigned_randomized = 0
    for subj in subjects:
        status = subj.get("status")
        start = (subj.get("period") or {}).get("start")
        if status in NOT_YET_SCREENED or not start:
            continue
        ref = (subj.get("individual") or {}).get("reference", "")
        site = None
        if ref.startswith("Patient/"):
            try:
                patient = store.read("Patient", ref.split("/", 1)[1])
            except NotFound:
                patient = None
            if patient is not None:
                site = by_org.get((patient.get("managingOrganization") or {}).get("reference"))
                inputs.append(_versioned(patient))
        if site is None:
            unassigned += 1
            unassigned_randomized += status not in SCREEN_FAILURE_STATUSES
            continue
        inputs.append(_versioned(subj))
        when = parse_datetime(start)
        site.screened.append(when)
        if status not in SCREEN_FAILURE_STATUSES:
            site.randomized.append(when)
    return Recruitment(study, sites, unassigned, unassigned_randomized, inputs)
