"""The dropout model's view of a participant, checked against the demo generator's own records.

The demo study is simulated as plain arrays and then written as FHIR; mapping it back must give
the visits, doses, adverse events and covariates the arrays say.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from fhir_ops import demo
from fhir_ops.errors import Unprocessable
from fhir_ops.mapping.history import load_history
from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    rec = demo.simulate_demo_records(seed=7, n=24)
    store = SQLiteStore(tmp_path_factory.mktemp("history") / "store.sqlite")
    for bundle in demo.demo_transactions(demo.build_demo_resources(rec)):
        store.transaction(bundle)
    yield store, rec
    store.close()


def test_history_matches_the_simulated_records(demo_store):
    store, rec = demo_store
    on_study = [i for i in range(rec.n) if not rec.withdrawn[i] and not rec.completed[i]]
    assert len(on_study) >= 5
    for i in on_study:
        mapped = load_history(store, f"tt201-p{i + 1:03d}")
        h, day = mapped.history, mapped.as_of_day
        last = int(rec.last_day[i])
        held = [(d, bool(rec.attended[i, v]), "remote" if demo.VISIT_REMOTE[v] else "in-person")
                for v, d in enumerate(demo.VISIT_DAYS) if d < last]
        assert [(v.day, v.attended, v.modality) for v in h.visits if v.attended is not None] == held
        assert h.next_visit(day).day == min(d for d in demo.VISIT_DAYS if d >= last)
        taken = {int(d) for d in np.flatnonzero(rec.taken[i, :last]) if d <= day}
        assert {d.day for d in h.doses if d.taken} == taken
        assert {d.day for d in h.doses} == set(range(day)) | taken  # today's dose only once recorded
        grades = [int(rec.ae_severity[i, d]) + 1 for d in np.flatnonzero(rec.ae[i, :last]) if d <= day]
        assert [a.severity for a in h.adverse_events] == grades  # mild, moderate, severe = 1, 2, 3
        assert h.weight_kg == pytest.approx(rec.weight_kg[i], abs=0.06)  # recorded to 0.1 kg or 0.1 lb
        assert h.egfr == pytest.approx(rec.egfr[i], abs=0.5)
        assert h.travel_distance_km == pytest.approx(rec.distance_km[i], abs=0.05)
        enrolled = demo.STUDY_START + dt.timedelta(days=int(rec.enroll_day[i]))
        born = dt.date(enrolled.year - int(rec.age_y[i]), 1, 1) - dt.timedelta(days=int(rec.birth_day_of_year[i]))
        assert h.age_years == pytest.approx((enrolled - born).days / 365.25, abs=1 / 365)  # as the demo writes it
        assert h.arm == demo.ARMS[rec.arm[i]] and h.sex == ("female" if rec.sex_female[i] else "male")
        assert mapped.randomized.date() == demo.STUDY_START + dt.timedelta(days=int(rec.enroll_day[i]))
        assert all("/_history/" in ref for ref in mapped.inputs)


def test_completed_participant_has_no_next_visit(demo_store):
    store, rec = demo_store
    i = next(i for i in range(rec.n) if rec.completed[i])
    with pytest.raises(Unprocessable) as err:
        load_history(store, f"tt201-p{i + 1:03d}")
    assert err.value.error_id == "no-next-visit"


def test_participant_without_history(demo_store):
    store, _ = demo_store
    store.update("Patient", "lonely", {"resourceType": "Patient", "id": "lonely", "gender": "male"})
    with pytest.raises(Unprocessable) as err:
        load_history(store, "lonely")
    assert (err.value.status, err.value.error_id) == (422, "participant-without-history")


def test_a_past_visit_still_booked_is_refused(demo_store):
    store, rec = demo_store
    i = next(i for i in range(rec.n) if not rec.withdrawn[i] and not rec.completed[i])
    pid = f"tt201-p{i + 1:03d}"
    booked = next(a for a in store.search_all("Appointment", [("actor", f"Patient/{pid}")]) if a["status"] == "booked")
    after = dt.datetime.fromisoformat(booked["start"].replace("Z", "+00:00")) + dt.timedelta(days=1)
    with pytest.raises(Unprocessable) as err:
        load_history(store, pid, after)
    assert err.value.error_id == "visit-without-outcome"
