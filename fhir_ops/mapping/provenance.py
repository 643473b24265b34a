"""Provenance for what TrialTwin generates: exact input versions, the model Device and who asked.

Shared by the operations that store computed resources (``$predict-dropout``, ``$simulate``).
"""
from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["build_provenance", "requesting_agent", "TWIN_PROVENANCE_PROFILE", "SERVER_AGENT",
           "REQUESTING_AGENT_HEADER"]

TWIN_PROVENANCE_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/twin-provenance"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
#: Header a client may use to say on whose behalf it asks. It is not authenticated (until SMART
#: authorization is wired into operations), so Provenance records it as the client's assertion.
REQUESTING_AGENT_HEADER = "X-Requesting-Agent"
#: Who asked, when nobody said: the TrialTwin server itself, named by identifier (a logical
#: reference; no Device resource is pretended to exist for it).
SERVER_AGENT = {"identifier": {"system": "https://trialtwin.org/fhir/sid/software", "value": "trialtwin-server"},
                "display": "TrialTwin server (the requesting user is not authenticated)"}


def requesting_agent(headers: dict | None, default: dict | str | None = None) -> dict:
    """The Reference recorded as the requesting agent of an operation call.

    Parameters
    ----------
    headers : dict, optional
        Request headers. ``X-Requesting-Agent: Practitioner/123`` is recorded as a reference whose
        display says it was asserted by the client and not authenticated.
    default : dict or str, optional
        What to record without the header (app config ``REQUESTING_AGENT``): a Reference dict or a
        literal ``Type/id``. Defaults to :data:`SERVER_AGENT`.

    Returns
    -------
    dict
        A FHIR Reference.

    Examples
    --------
    >>> requesting_agent({"X-Requesting-Agent": "Practitioner/p1"})["reference"]
    'Practitioner/p1'
    >>> requesting_agent({})["identifier"]["value"]
    'trialtwin-server'
    """
    for key, value in (headers or {}).items():
        if key.lower() == REQUESTING_AGENT_HEADER.lower() and value.strip():
            return {"reference": value.strip(),
                    "display": f"asserted by the client in {REQUESTING_AGENT_HEADER}, not authenticated"}
    if isinstance(default, str) and default:
        return {"reference": default}
    if isinstance(default, dict) and default:
        return dict(default)
    return dict(SERVER_AGENT)


def _reference(agent: str | dict | None) -> dict:
    if agent is None:
        return dict(SERVER_AGENT)
    return {"reference": agent} if isinstance(agent, str) else dict(agent)


def build_provenance(targets: list[str], inputs: list[str], model_device: dict, agent: str | dict | None,
                     activity: str, *, recorded: datetime | None = None) -> dict:
    """A Provenance (profile ``twin-provenance``) for resources computed by a model.

    Parameters
    ----------
    targets : list of str
        Versioned references of the generated resources (``RiskAssessment/x/_history/1``).
    inputs : list of str
        Versioned references of every resource the computation read; each becomes an ``entity`` with
        role ``source``, so a reader can fetch the exact versions used.
    model_device : dict
        The stored model Device (:func:`fhir_ops.mapping.model_device.ensure_model_device`); recorded
        as the agent of type ``assembler`` by its versioned reference.
    agent : str or dict or None
        Who asked (:func:`requesting_agent`): a literal reference or a Reference dict; recorded as
        the agent of type ``author``. None records :data:`SERVER_AGENT`.
    activity : str
        What was done, as text (``"$predict-dropout"``).
    recorded : datetime, optional
        Defaults to now (UTC).

    Returns
    -------
    dict
        The Provenance, without id; store it in the same transaction as its targets.

    Raises
    ------
    ValueError
        No targets or no inputs (the profile requires both), or a target that is not versioned.

    Examples
    --------
    >>> device = {"resourceType": "Device", "id": "d1", "meta": {"versionId": "1"}}
    >>> p = build_provenance(["RiskAssessment/r1/_history/1"], ["Patient/p1/_history/3"], device, None,
    ...                      "$predict-dropout")
    >>> [a["type"]["coding"][0]["code"] for a in p["agent"]], p["entity"][0]["what"]["reference"]
    (['assembler', 'author'], 'Patient/p1/_history/3')
    """
    if not targets or not inputs:
        raise ValueError("a twin Provenance needs at least one target and one input")
    unversioned = [t for t in targets if "/_history/" not in t]
    if unversioned:
        raise ValueError(f"Provenance targets must be versioned references: {unversioned}")
    when = (recorded or datetime.now(timezone.utc)).astimezone(timezone.utc)
    version = model_device.get("meta", {}).get("versionId")
    device_ref = f"Device/{model_device['id']}" + (f"/_history/{version}" if version else "")
    names = [n.get("name") for n in model_device.get("deviceName", []) if n.get("name")]
    versions = [v.get("value") for v in model_device.get("version", []) if v.get("value")]
    return {
        "resourceType": "Provenance",
        "meta": {"profile": [TWIN_PROVENANCE_PROFILE]},
        "target": [{"reference": t} for t in targets],
        "recorded": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "activity": {"text": activity},
        "agent": [
            {"type": _participant("assembler", "Assembler"),
             "who": {"reference": device_ref,
                     "display": "@".join(filter(None, [", ".join(names), ", ".join(versions)])) or "model"}},
            {"type": _participant("author", "Author"), "who": _reference(agent)},
        ],
        "entity": [{"role": "source", "what": {"reference": ref}} for ref in dict.fromkeys(inputs)],
    }


def _participant(code: str, display: str) -> dict:
    return {"coding": [{"system": PARTICIPANT_TYPE, "code": code, "display": display}]}
