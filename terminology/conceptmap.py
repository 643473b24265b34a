"""ConceptMap/$translate as a pure function over ConceptMaps, with an index built once per map version.

``MapIndex`` turns a ConceptMap into dict look-ups (forward and reverse); ``translate`` produces the
R4 ``Parameters`` output (``result``, ``message``, ``match`` with ``equivalence``/``concept``/``source``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fhir_ops.errors import InvalidRequest, NotFound

#: equivalences that say the target is a usable translation (R4: anything but unmatched/disjoint)
POSITIVE = frozenset({"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower",
                      "specializes", "inexact"})
#: reading a mapping backwards turns "the target is wider" into "the target is narrower"
_INVERSE = {"wider": "narrower", "narrower": "wider", "subsumes": "specializes", "specializes": "subsumes"}


@dataclass(frozen=True)
class Mapping:
    """One source -> target row of a ConceptMap, flattened."""

    source_system: str
    source_version: str | None
    source_code: str
    source_display: str | None
    target_system: str
    target_version: str | None
    target_code: str | None
    target_display: str | None
    equivalence: str
    comment: str | None = None
    product: tuple = ()


@dataclass
class MapIndex:
    """A ConceptMap indexed for $translate: ``forward[(system, code)]`` and ``reverse[(system, code)]``."""

    resource: dict
    forward: dict[tuple[str, str], list[Mapping]] = field(default_factory=dict)
    reverse: dict[tuple[str, str], list[Mapping]] = field(default_factory=dict)

    @classmethod
    def build(cls, resource: dict) -> "MapIndex":
        index = cls(resource)
        for m in iter_mappings(resource):
            index.forward.setdefault((m.source_system, m.source_code), []).append(m)
            if m.target_code is not None:
                index.reverse.setdefault((m.target_system, m.target_code), []).append(m)
        return index

    @property
    def url(self) -> str:
        return self.resource.get("url", "")

    @property
    def version(self) -> str | None:
        return self.resource.get("version")

    def scope(self, end: str) -> str | None:
        """``sourceUri``/``sourceCanonical`` (end='source') or the target equivalent."""
        return self.resource.get(f"{end}Uri") or self.resource.get(f"{end}Canonical")


def iter_mappings(resource: dict):
    """Every mapping row of a ConceptMap, in document order."""
    for group in resource.get("group", []):
        for element in group.get("element", []):
            for target in element.get("target", []) or [{"equivalence": "unmatched"}]:
                yield Mapping(
                    source_system=group.get("source", ""), source_version=group.get("sourceVersion"),
                    source_code=element.get("code", ""), source_display=element.get("display"),
                    target_system=group.get("target", ""), target_version=group.get("targetVersion"),
                    target_code=target.get("code"), target_display=target.get("display"),
                    equivalence=target.get("equivalence", "equivalent"), comment=target.get("comment"),
                    product=tuple((d.get("property"), d.get("system"), d.get("value"))
                                  for d in target.get("product", [])))


class MapSet:
    """The ConceptMaps one translation may use, each indexed once per (url, version, versionId)."""

    def __init__(self, maps: list[dict] = ()) -> None:
        self._indexes: dict[tuple, MapIndex] = {}
        self.maps: list[MapIndex] = [self.index(m) for m in maps]

    def index(self, resource: dict) -> MapIndex:
        key = (resource.get("url"), resource.get("version"),
               resource.get("meta", {}).get("versionId"), resource.get("id"))
        idx = self._indexes.get(key)
        if idx is None:
            idx = self._indexes[key] = MapIndex.build(resource)
        return idx

    def select(self, url: str | None = None, version: str | None = None) -> list[MapIndex]:
        if url is None:
            return self.maps
        chosen = [m for m in self.maps if m.url == url and (version is None or m.version == version)]
        if not chosen:
            raise NotFound(f"concept map '{url}'" + (f" version '{version}'" if version else "")
                           + " is not known to this server", error_id="unknown-concept-map")
        return chosen


def _param(name: str, value_type: str, value) -> dict:
    return {"name": name, f"value{value_type}": value}


def _match(m: Mapping, reverse: bool, map_url: str) -> dict:
    if reverse:
        concept = {"system": m.source_system, "code": m.source_code}
        version, display, equivalence = m.source_version, m.source_display, _INVERSE.get(m.equivalence, m.equivalence)
    else:
        concept = {"system": m.target_system, "code": m.target_code}
        version, display, equivalence = m.target_version, m.target_display, m.equivalence
    if version:
        concept["version"] = version
    if display:
        concept["display"] = display
    parts = [_param("equivalence", "Code", equivalence)]
    if concept.get("code") is not None:
        parts.append(_param("concept", "Coding", concept))
    if not reverse:
        for prop, system, value in m.product:
            parts.append({"name": "product", "part": [_param("element", "Uri", prop),
                                                       _param("concept", "Coding", {"system": system, "code": value})]})
    parts.append(_param("source", "Uri", map_url))
    return {"name": "match", "part": parts}


def find(maps: list[MapIndex], system: str, code: str, *, version: str | None = None,
         reverse: bool = False, target_system: str | None = None) -> list[tuple[Mapping, MapIndex]]:
    """The mapping rows for one coding (dictionary look-ups; no scan)."""
    found = []
    for idx in maps:
        rows = (idx.reverse if reverse else idx.forward).get((system, code), ())
        for m in rows:
            other = m.source_system if reverse else m.target_system
            if target_system is not None and other != target_system:
                continue
            own_version = m.target_version if reverse else m.source_version
            if version is not None and own_version is not None and version != own_version:
                continue
            found.append((m, idx))
    return found


def translate(maps: MapSet | list[dict], *, code: str | None = None, system: str | None = None,
              version: str | None = None, coding: dict | None = None, codeable_concept: dict | None = None,
              url: str | None = None, concept_map_version: str | None = None, source: str | None = None,
              target: str | None = None, target_system: str | None = None, reverse: bool = False) -> dict:
    """ConceptMap/$translate.

    Parameters
    ----------
    maps : MapSet or list of dict
        The ConceptMaps in force (normally the active version of each map).
    code, system, version : str, optional
        The concept to translate (``system`` required with ``code``).
    coding, codeable_concept : dict, optional
        Alternatives to ``code``/``system``; every coding of a CodeableConcept is tried.
    url, concept_map_version : str, optional
        Restrict to one ConceptMap (and version).
    source, target : str, optional
        Value set scopes: only maps whose ``sourceUri``/``targetUri`` (or canonical) match.
    target_system : str, optional
        Only matches into this code system (``targetsystem``).
    reverse : bool
        Translate from target to source; equivalences are read backwards (wider <-> narrower).

    Returns
    -------
    dict
        R4 ``Parameters``: ``result`` (true when a match other than unmatched/disjoint exists),
        ``message`` when there is none, and one ``match`` per mapping found.

    Examples
    --------
    >>> from terminology.catalog import shipped
    >>> out = translate(shipped("ConceptMap"), system="urn:iso:std:iso:11073:10101", code="188736")
    >>> out["parameter"][0]
    {'name': 'result', 'valueBoolean': True}
    """
    if not isinstance(maps, MapSet):
        maps = MapSet(maps)
    if concept_map_version is not None and url is None:
        raise InvalidRequest("'conceptMapVersion' needs 'url' (the concept map it is a version of)",
                             error_id="missing-parameter")
    if codeable_concept is not None:
        codings = list(codeable_concept.get("coding", []))
    elif coding is not None:
        codings = [coding]
    else:
        codings = [{"system": system, "code": code, "version": version}] if code is not None else []
    if not codings or any(not c.get("code") or not c.get("system") for c in codings):
        raise InvalidRequest("$translate needs 'code' with 'system', a 'coding' or a 'codeableConcept' "
                             "whose codings have system and code", error_id="missing-parameter")
    chosen = [m for m in maps.select(url, concept_map_version)
              if (source is None or m.scope("target" if reverse else "source") == source)
              and (target is None or m.scope("source" if reverse else "target") == target)]
    matches, positive = [], False
    for c in codings:
        for m, idx in find(chosen, c["system"], c["code"], version=c.get("version"), reverse=reverse,
                           target_system=target_system):
            matches.append(_match(m, reverse, idx.url))
            positive = positive or m.equivalence in POSITIVE
    out = [_param("result", "Boolean", positive)]
    if not positive:
        what = ", ".join(f"{c['system']}|{c['code']}" for c in codings)
        scope = f" in concept map '{url}'" if url else ""
        direction = "reverse " if reverse else ""
        out.append(_param("message", "String",
                          f"no {direction}mapping found for {what}{scope}"
                          + (f" into '{target_system}'" if target_system else "")))
    out.extend(matches)
    return {"resourceType": "Parameters", "parameter": out}


def translate_linear(concept_map: dict, system: str, code: str) -> list[dict]:
    """Baseline for the benchmark: the same forward look-up by scanning the ConceptMap every time."""
    hits = []
    for group in concept_map.get("group", []):
        if group.get("source") != system:
            continue
        for element in group.get("element", []):
            if element.get("code") == code:
                hits.extend({"system": group.get("target"), **t} for t in element.get("target", []))
    return hits


__all__ = ["Mapping", "MapIndex", "MapSet", "POSITIVE", "find", "iter_mappings", "translate", "translate_linear"]
