"""CodeSystem/$lookup, CodeSystem/$validate-code and ValueSet/$validate-code as pure functions.

Inputs are the R4 operation parameters (already parsed); outputs are R4 ``Parameters`` dicts
shaped exactly as the operation definitions require.
"""
from __future__ import annotations

from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from terminology import ucum
from terminology.catalog import UCUM, Catalog, default_catalog


def _param(name: str, value_type: str, value) -> dict:
    return {"name": name, f"value{value_type}": value}


def _coding_from(system, code, version, coding, *, code_name="code", system_name="system"):
    """Resolve the (system, code, version, display) the client meant from either form of input."""
    if coding is not None:
        if code is not None or system is not None:
            raise InvalidRequest(f"give either '{code_name}'+'{system_name}' or 'coding', not both",
                                 error_id="conflicting-parameters")
        return coding.get("system"), coding.get("code"), coding.get("version"), coding.get("display")
    return system, code, version, None


def lookup(catalog: Catalog | None = None, *, code: str | None = None, system: str | None = None,
           version: str | None = None, coding: dict | None = None,
           property: list[str] | None = None, display_language: str | None = None) -> dict:
    """CodeSystem/$lookup: details of one concept.

    Parameters
    ----------
    catalog : Catalog, optional
        Code systems to look in (default: the shipped subsets).
    code, system, version : str
        The concept (``system`` is required with ``code``).
    coding : dict, optional
        A Coding instead of ``code``/``system``.
    property : list of str, optional
        Property codes to return; all of the concept's properties when omitted.
    display_language : str, optional
        Preferred language of ``display`` (a matching designation is used if one exists).

    Returns
    -------
    dict
        ``Parameters`` with ``name``, ``version``, ``display``, ``designation`` and ``property``.

    Raises
    ------
    FhirError
        400 when inputs are missing, 404 for an unknown code system or code.
    """
    catalog = catalog or default_catalog()
    system, code, version, _ = _coding_from(system, code, version, coding)
    if not code or not system:
        raise InvalidRequest("$lookup needs 'code' and 'system' (or a 'coding' with both)",
                             error_id="missing-parameter")
    if system == UCUM:
        if not ucum.is_valid(code):
            raise NotFound(f"'{code}' is not a valid UCUM unit code", error_id="unknown-code")
        return {"resourceType": "Parameters", "parameter": [
            _param("name", "String", "UCUM"), _param("display", "String", code)]}
    cs = catalog.code_system(system)
    if cs is None:
        raise NotFound(f"code system '{system}' is not known to this server; load its release with "
                       "'trialtwin terminology load'", error_id="unknown-code-system")
    if version and cs.version and version != cs.version:
        raise NotFound(f"code system '{system}' version '{version}' is not known (loaded: {cs.version})",
                       error_id="unknown-code-system-version")
    concept = cs.concepts.get(code)
    if concept is None:
        raise NotFound(f"code '{code}' is not in code system '{system}'"
                       + (" (this server holds a subset; load the full release)" if cs.resource.get("content") == "fragment" else ""),
                       error_id="unknown-code")
    display = concept.get("display", code)
    if display_language:
        for d in concept.get("designation", []):
            if d.get("language") == display_language:
                display = d["value"]
                break
    out = [_param("name", "String", cs.resource.get("title") or cs.resource.get("name") or system)]
    if cs.version:
        out.append(_param("version", "String", cs.version))
    out.append(_param("display", "String", display))
    for d in concept.get("designation", []):
        parts = []
        if d.get("language"):
            parts.append(_param("language", "Code", d["language"]))
        if d.get("use"):
            parts.append(_param("use", "Coding", d["use"]))
        parts.append(_param("value", "String", d["value"]))
        out.append({"name": "designation", "part": parts})
    wanted = set(property) if property else None
    if concept.get("definition") and (wanted is None or "definition" in wanted):
        out.append({"name": "property", "part": [_param("code", "Code", "definition"),
                                                  _param("value", "String", concept["definition"])]})
    for p in concept.get("property", []):
        if wanted is not None and p["code"] not in wanted:
            continue
        value_key = next(k for k in p if k.startswith("value"))
        out.append({"name": "property", "part": [_param("code", "Code", p["code"]),
                                                  {"name": "value", value_key: p[value_key]}]})
    return {"resourceType": "Parameters", "parameter": out}


def _check_in_system(catalog: Catalog, system, code, version, display) -> tuple[bool, str | None, str | None]:
    """(valid, message, display) for one coding against its code system."""
    if not system:
        return False, f"the code '{code}' has no system, so it cannot be validated", None
    if system == UCUM:
        try:
            ucum.parse(code)
        except ucum.UcumError as exc:
            return False, str(exc), None
        return True, None, code
    cs = catalog.code_system(system)
    if cs is None:
        return False, f"the code system '{system}' is not known to this server", None
    if version and cs.version and version != cs.version:
        return False, f"version '{version}' of code system '{system}' is not known (loaded: {cs.version})", None
    concept = cs.concepts.get(code)
    if concept is None:
        return False, f"the code '{code}' is not in code system '{system}'", None
    canonical = concept.get("display", code)
    if display is not None:
        allowed = {canonical, *(d["value"] for d in concept.get("designation", []))}
        if display not in allowed:
            return False, (f"the display '{display}' is not a valid display for the code '{system}|{code}' "
                           f"(expected '{canonical}')"), canonical
    return True, None, canonical


def _value_set_contains(catalog: Catalog, vs: dict, system: str, code: str, seen: frozenset = frozenset()) -> bool:
    url = vs.get("url")
    if url in seen:
        raise Unprocessable(f"value set '{url}' includes itself", error_id="value-set-cycle")
    seen = seen | {url}

    def matches(rule: dict) -> bool:
        if rule.get("filter"):
            raise Unprocessable(f"value set '{url}' uses compose filters, which this server does not evaluate",
                                error_id="value-set-filter-unsupported")
        ok = True
        if rule.get("system"):
            if rule["system"] != system:
                return False
            if rule.get("concept"):
                ok = any(c["code"] == code for c in rule["concept"])
            else:
                ok = _check_in_system(catalog, system, code, None, None)[0]
        for ref in rule.get("valueSet", []):
            inner = catalog.value_sets.get(ref.split("|")[0])
            if inner is None:
                raise NotFound(f"value set '{ref}' (included by '{url}') is not known", error_id="unknown-value-set")
            ok = ok and _value_set_contains(catalog, inner, system, code, seen)
        return ok

    compose = vs.get("compose", {})
    if not any(matches(r) for r in compose.get("include", [])):
        return False
    return not any(matches(r) for r in compose.get("exclude", []))


def validate_code(catalog: Catalog | None = None, *, value_set: str | None = None, url: str | None = None,
                  code: str | None = None, system: str | None = None, version: str | None = None,
                  display: str | None = None, coding: dict | None = None,
                  codeable_concept: dict | None = None) -> dict:
    """CodeSystem/$validate-code (``value_set`` None) or ValueSet/$validate-code.

    Parameters
    ----------
    catalog : Catalog, optional
        Code systems and value sets (default: the shipped subsets).
    value_set : str, optional
        Canonical url of the ValueSet to validate against (ValueSet/$validate-code).
    url : str, optional
        For CodeSystem/$validate-code, the code system url (same as ``system``).
    code, system, version, display : str, optional
        The concept; a ``display`` that is not the concept's display or a designation fails.
    coding : dict, optional
        A Coding instead of ``code``/``system``.
    codeable_concept : dict, optional
        A CodeableConcept: valid when any of its codings is valid.

    Returns
    -------
    dict
        ``Parameters`` with ``result``, ``message`` (when not valid) and ``display``.
    """
    catalog = catalog or default_catalog()
    if value_set is None and url:
        if system and system != url:
            raise InvalidRequest(f"'url' ({url}) and 'system' ({system}) disagree", error_id="conflicting-parameters")
        system = url
    if codeable_concept is not None:
        codings = list(codeable_concept.get("coding", []))
        if not codings:
            raise InvalidRequest("'codeableConcept' has no coding to validate", error_id="missing-parameter")
    else:
        s, c, v, d = _coding_from(system, code, version, coding)
        if not c:
            raise InvalidRequest("$validate-code needs 'code' (with 'system'), 'coding' or 'codeableConcept'",
                                 error_id="missing-parameter")
        codings = [{"system": s, "code": c, "version": v, "display": display if display is not None else d}]
    vs = None
    if value_set is not None:
        vs = catalog.value_sets.get(value_set.split("|")[0])
        if vs is None:
            raise NotFound(f"value set '{value_set}' is not known to this server", error_id="unknown-value-set")
    messages = []
    for cd in codings:
        ok, msg, disp = _check_in_system(catalog, cd.get("system"), cd.get("code"), cd.get("version"), cd.get("display"))
        if ok and vs is not None and not _value_set_contains(catalog, vs, cd.get("system"), cd.get("code")):
            ok, msg = False, f"the code '{cd.get('system')}|{cd.get('code')}' is not in the value set '{vs['url']}'"
        if ok:
            out = [_param("result", "Boolean", True)]
            if disp:
                out.append(_param("display", "String", disp))
            return {"resourceType": "Parameters", "parameter": out}
        messages.append(msg)
        last_display = disp
    out = [_param("result", "Boolean", False), _param("message", "String", "; ".join(messages))]
    if last_display:
        out.append(_param("display", "String", last_display))
    return {"resourceType": "Parameters", "parameter": out}


__all__ = ["lookup", "validate_code"]
