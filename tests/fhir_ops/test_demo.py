"""The TT-201 demo generator: deterministic, valid R4, and the counts and proportions intended."""
from __future__ import annotations

import collections
import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_ops import demo

pytestmark = pytest.mark.unit

CUTOFF = demo.STUDY_START + dt.timedelta(days=demo.DATA_CUTOFF_DAY)


@pytest.fixture(scope="module")
def records():
    return demo.simulate_demo_records(seed=7, n=200)


@pytest.fixture(scope="module")
def resources(records):
    return demo.build_demo_resources(records)


def by_type(resources, resource_type):
    return [r for r in resources if r["resourceType"] == resource_type]


def codes(resource):
    return {(c["system"], c["code"]) for c in resource["code"]["coding"]}


def test_same_seed_same_study_other_seed_other_study(resources):
    assert demo.build_demo_resources(demo.simulate_demo_records(seed=7, n=200)) == resources
    other = demo.build_demo_resources(demo.simulate_demo_records(seed=8, n=200))
    assert other != resources


def test_every_resource_is_valid_r4(resources):
    failures = []
    for resource in resources:
        try:
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        except Exception as exc:  # collect all, report the first few
            failures.append(f"{resource['resourceType']}/{resource['id']}: {str(exc)[:200]}")
    assert not failures, failures[:5]
    ids = [(r["resourceType"], r["id"]) for r in resources]
    assert len(ids) == len(set(ids))


def test_every_reference_resolves_inside_the_study(resources):
    known = {f"{r['resourceType']}/{r['id']}" for r in resources}

    def refs(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    dangling = {ref for r in resources for ref in refs(r) if ref not in known}
    assert not dangling


def test_study_design(records, resources):
    counts = collections.Counter(r["resourceType"] for r in resources)
    assert counts["Patient"] == counts["ResearchSubject"] == 200
    assert counts["Organization"] == 4 and counts["Location"] == 3 and counts["ResearchStudy"] == 1
    assert resources[-1]["resourceType"] == "ResearchStudy"  # loaded last: marks a complete load
    study = resources[-1]
    assert [a["name"] for a in study["arm"]] == ["placebo", "50 mg", "100 mg"]
    arms = collections.Counter(r["assignedArm"] for r in by_type(resources, "ResearchSubject"))
    assert max(arms.values()) - min(arms.values()) <= 2  # permuted blocks of 6
    sites = collections.Counter(p["managingOrganization"]["reference"] for p in by_type(resources, "Patient"))
    assert len(sites) == 3 and min(sites.values()) >= 30


def test_status_mix_and_behaviour(records, resources):
    status = collections.Counter(r["status"] for r in by_type(resources, "ResearchSubject"))
    assert set(status) == {"withdrawn", "off-study", "on-study-intervention"}
    assert 0.03 <= status["withdrawn"] / 200 <= 0.25
    assert 0.10 <= status["off-study"] / 200 <= 0.50
    adherence = records.taken.sum() / records.last_day.sum()
    # taken doses never fall after the data cut or a dropout
    assert not any(records.taken[i, last_day:].any() for i, last_day in enumerate(records.last_day))
    assert 0.80 <= adherence <= 0.97
    appointments = collections.Counter(a["status"] for a in by_type(resources, "Appointment"))
    past = appointments["fulfilled"] + appointments["noshow"] - 200  # baseline visits are all attended
    assert 0.05 <= appointments["noshow"] / past <= 0.30
    assert appointments["booked"] == status["on-study-intervention"]  # each ongoing participant's next visit
    assert appointments["fulfilled"] == len(by_type(resources, "Encounter"))
    doses = by_type(resources, "MedicationAdministration")
    assert len(doses) == int(records.taken.sum())
    assert {d["effectiveDateTime"][:10] < CUTOFF.isoformat() for d in doses} == {True}
    assert 20 <= len(by_type(resources, "AdverseEvent")) <= 300


def test_measurements_carry_the_agreed_codes_and_units(resources):
    loinc = {"4548-4": {"%"}, "1558-6": {"mg/dL", "mmol/L"}, "29463-7": {"kg", "[lb_av]"}, "8867-4": {"/min"},
             "8480-6": {"mm[Hg]"}, "62238-1": {"mL/min/{1.73_m2}"}}
    seen = collections.defaultdict(set)
    for obs in by_type(resources, "Observation"):
        coding = codes(obs)
        code = next((c for s, c in coding if s == demo.LOINC), None)
        if code is None:
            assert coding <= {(demo.CS + "assay", "TTX101-PK"), (demo.CS + "covariate", "travel-distance")}
            continue
        assert obs["valueQuantity"]["system"] == demo.UCUM
        seen[code].add(obs["valueQuantity"]["code"])
        extra = {s for s, _ in coding} - {demo.LOINC}
        if code in ("8867-4", "8480-6"):
            assert extra == {demo.MDC}
        elif code in ("4548-4", "1558-6", "62238-1"):
            assert extra == {demo.EDC_LAB}
    assert {k: v for k, v in seen.items()} == loinc  # both unit variants occur where intended
    mmol = [o for o in by_type(resources, "Observation") if o["valueQuantity"].get("code") == "mmol/L"]
    assert mmol and all(3.0 < o["valueQuantity"]["value"] < 20.0 for o in mmol)


def test_drug_effect_and_pk_scale_with_dose(records):
    end = 6  # week-24 visit
    seen = records.attended[:, end] & (records.last_day > demo.VISIT_DAYS[end])
    change = {a: np.mean(records.hba1c_pct[(records.arm == a) & seen, end]
                         - records.hba1c_pct[(records.arm == a) & seen, 0]) for a in range(3)}
    assert change[2] < change[1] < change[0]
    sampled = records.attended[:, [3, 6]]
    pk = {a: np.median(records.pk_ng_ml[:, [3, 6]][(records.arm[:, None] == a) & sampled]) for a in (1, 2)}
    assert 1.6 <= pk[2] / pk[1] <= 2.5  # linear PK: double dose, about double concentration
    assert np.all(records.pk_ng_ml[records.arm == 0] == 0)


def test_pk_observations_only_for_active_arms_at_in_person_visits(records, resources):
    pk = [o for o in by_type(resources, "Observation") if (demo.CS + "assay", "TTX101-PK") in codes(o)]
    arm_of = {f"Patient/tt201-p{i + 1:03d}": demo.ARMS[a] for i, a in enumerate(records.arm)}
    assert pk and {arm_of[o["subject"]["reference"]] for o in pk} == {"50 mg", "100 mg"}
    assert {o["id"].rsplit("-", 1)[1] for o in pk} <= {"v3", "v6"}


def test_small_study_and_bad_size():
    rec = demo.simulate_demo_records(seed=1, n=3)
    assert len(by_type(demo.build_demo_resources(rec), "Patient")) == 3
    with pytest.raises(ValueError):
        demo.simulate_demo_records(seed=1, n=0)


def test_transactions_are_puts_with_the_study_last(resources):
    bundles = list(demo.demo_transactions(resources, batch_size=5000))
    assert all(b["type"] == "transaction" for b in bundles)
    entries = [e for b in bundles for e in b["entry"]]
    assert len(entries) == len(resources)
    assert entries[-1]["request"] == {"method": "PUT", "url": "ResearchStudy/tt-201"}


def test_the_study_references_its_model_definition_which_comes_first(resources):
    from fhir_ops.mapping import model_definition as fm

    study = by_type(resources, "ResearchStudy")[0]
    assert fm.study_model_canonical(study) == demo.MODEL_DEFINITION.canonical
    library = resources[0]
    assert library["resourceType"] == "Library" and fm.is_definition_library(library)
    assert fm.definition_of_library(library).canonical == demo.MODEL_DEFINITION.canonical
    # the data are simulated from that definition: its arms' doses are the demo's
    assert demo.ARM_DOSE_MG == tuple(demo.MODEL.arms[a] for a in demo.ARMS) == (0.0, 50.0, 100.0)


def test_a_demo_loaded_before_the_definition_gets_it(tmp_path):
    """A ./data made by an earlier version holds the study without its model reference: ensure_demo_study
    adds the Library and the reference (twins need it), and touches nothing else."""
    from fhir_ops.mapping import model_definition as fm
    from fhir_ops.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "old.sqlite"))
    try:
        old = [r for r in demo.build_demo_resources(demo.simulate_demo_records(seed=1, n=3))
               if r["resourceType"] != "Library"]
        old[-1] = {k: v for k, v in old[-1].items() if k != "extension"}
        for bundle in demo.demo_transactions(old):
            store.transaction(bundle)
        assert fm.study_model_canonical(store.read("ResearchStudy", demo.STUDY_ID)) is None
        assert demo.ensure_demo_study(store, participants=3, seed=1) == 2
        study = store.read("ResearchStudy", demo.STUDY_ID)
        assert fm.study_model_canonical(study) == demo.MODEL_DEFINITION.canonical
        assert fm.study_model(store, study)[1].canonical == demo.MODEL_DEFINITION.canonical
        assert demo.ensure_demo_study(store, participants=3, seed=1) == 0
    finally:
        store.close()


def test_the_examples_named_in_the_readme_and_console_have_the_status_they_are_named_for(resources):
    # The README and the demo's console name example participants of the default demo; a change to the
    # generator that moves them (tt201-p003 went off study once and the README went stale) fails here.
    from fhir_ops.commands.demo import EXAMPLE_PARTICIPANT, add_parser

    import argparse

    defaults = add_parser(argparse.ArgumentParser().add_subparsers()).parse_args([])
    assert (defaults.participants, defaults.seed) == (200, 7)  # the study this fixture generates
    status = {r["individual"]["reference"].split("/")[1]: r["status"] for r in by_type(resources, "ResearchSubject")}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    on_study = re.findall(r"e\.g\. `(tt201-p\d{3})`, on study in the demo", readme)
    off_study = re.findall(r"off study or\s+withdrew \(e\.g\. `(tt201-p\d{3})`\)", readme)
    assert on_study and off_study, "README no longer names its example participants where this test looks"
    for pid in on_study + [EXAMPLE_PARTICIPANT]:
        assert status[pid].startswith("on-study"), (pid, status[pid])
    for pid in off_study:
        assert status[pid] in ("off-study", "withdrawn"), (pid, status[pid])
