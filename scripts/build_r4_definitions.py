"""Build fhir_ops/r4/definitions.json from the official FHIR R4 (4.0.1) definitions.

The definitions come from the Maven Central artifact
``ca.uhn.hapi.fhir:hapi-fhir-validation-resources-r4`` (the version hapi/pom.xml pins), which ships
the R4 specification's ``profiles-types``, ``profiles-resources`` and value-set bundles (CC0).
The output keeps only what the validator needs: per type its snapshot elements (path, cardinality,
types, content references, required value-set bindings of ``code`` elements), the primitive
types' regular expressions, and the expansions of those required value sets. The server never
needs the registry at run time; this script is run again only to move to another package version.

Usage::

    python scripts/build_r4_definitions.py [--jar PATH] [--out fhir_ops/r4/definitions.json]

Without ``--jar`` the jar is looked up in the local Maven repository and fetched with
``mvn dependency:get`` when absent.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

NS = "{http://hl7.org/fhir}"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = "ca.uhn.hapi.fhir:hapi-fhir-validation-resources-r4"
_MODEL = "org/hl7/fhir/r4/model/"
_REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_SD = "http://hl7.org/fhir/StructureDefinition/"
#: constraint profiles that the base definitions use as element types (kept as types of their own)
_TYPE_PROFILES = ("SimpleQuantity",)


def pinned_hapi_version() -> str:
    """The HAPI FHIR version hapi/pom.xml pins (the validation resources follow it)."""
    match = re.search(r"<hapi\.version>([^<]+)</hapi\.version>", (ROOT / "hapi" / "pom.xml").read_text())
    if not match:
        sys.exit("hapi/pom.xml pins no <hapi.version>")
    return match.group(1)


def locate_jar(version: str, repo: Path) -> Path:
    """The artifact's jar in the Maven repository ``repo``, fetched with mvn when missing."""
    group, name = ARTIFACT.split(":")
    jar = repo / Path(*group.split(".")) / name / version / f"{name}-{version}.jar"
    if not jar.exists():
        subprocess.run(["mvn", "-q", "dependency:get", f"-Dartifact={ARTIFACT}:{version}",
                        "-Dtransitive=false", f"-Dmaven.repo.local={repo}"], check=True)
    return jar


def _v(node, tag: str):
    child = node.find(NS + tag)
    return None if child is None else child.get("value")


def _bundle_resources(archive: zipfile.ZipFile, member: str):
    root = ET.fromstring(archive.read(_MODEL + member))
    for res in root.findall(f"{NS}entry/{NS}resource/*"):
        yield res.tag[len(NS):], res


def _element(el) -> list:
    """One snapshot element as [path, min, max, types, binding, contentReference]."""
    types = []
    for t in el.findall(NS + "type"):
        code = _v(t, "code")
        fhir_type = next((x.find(NS + "valueUrl").get("value") for x in t.findall(NS + "extension")
                          if x.get("url") == _FHIR_TYPE_EXT), None)
        if code and code.startswith("http://hl7.org/fhirpath/System."):
            # element ids and Extension.url are plain strings (the spec's 'compiler magic')
            code = fhir_type or "System." + code.rsplit(".", 1)[1]
        profiles = [p.get("value") for p in t.findall(NS + "profile")]
        if code == "Quantity" and f"{_SD}SimpleQuantity" in profiles:
            code = "SimpleQuantity"  # a Quantity without comparator: the base types keep this constraint
        types.append(code)
    binding = None
    b = el.find(NS + "binding")
    if b is not None and _v(b, "strength") == "required" and types == ["code"]:
        binding = (_v(b, "valueSet") or "").split("|")[0] or None
    ref = _v(el, "contentReference")
    return [_v(el, "path"), int(_v(el, "min") or 0), _v(el, "max") or "*", types, binding,
            ref[1:] if ref else None]


def structure_definitions(archive: zipfile.ZipFile) -> tuple[dict, dict]:
    """(types, primitives): every R4 base type and resource, and each primitive's JSON kind and regex."""
    types: dict = {}
    primitives: dict = {}
    for member in ("profile/profiles-types.xml", "profile/profiles-resources.xml"):
        for tag, sd in _bundle_resources(archive, member):
            name, kind = _v(sd, "id"), _v(sd, "kind")
            if tag != "StructureDefinition" or (_v(sd, "derivation") == "constraint" and name not in _TYPE_PROFILES):
                continue  # other constraint profiles (MoneyQuantity...) add no type
            elements = [_element(e) for e in sd.findall(f"{NS}snapshot/{NS}element")]
            if name in _TYPE_PROFILES:
                base = _v(sd, "type")  # its snapshot paths start with the constrained type's name
                elements = [[name + e[0][len(base):], *e[1:]] for e in elements]
            types[name] = {"kind": kind, "abstract": _v(sd, "abstract") == "true",
                           "base": (_v(sd, "baseDefinition") or "").rsplit("/", 1)[-1] or None,
                           "elements": elements[1:]}
            if kind == "primitive-type":
                value = next(e for e in sd.findall(f"{NS}snapshot/{NS}element") if _v(e, "path") == f"{name}.value")
                regex = None
                for t in value.findall(NS + "type"):
                    for x in t.findall(NS + "extension"):
                        if x.get("url") == _REGEX_EXT:
                            regex = x.find(NS + "valueString").get("value")
                primitives[name] = {"regex": regex}
    return types, primitives


def _concepts(node, out: list) -> None:
    for c in node.findall(NS + "concept"):
        out.append(_v(c, "code"))
        _concepts(c, out)  # hierarchical code systems: children are members too


def terminology(archive: zipfile.ZipFile) -> tuple[dict, dict]:
    """(code systems: url -> codes or None when not shipped, value sets: url -> compose)."""
    systems: dict = {}
    valuesets: dict = {}
    for member in ("valueset/valuesets.xml", "valueset/v3-codesystems.xml", "valueset/v2-tables.xml"):
        for tag, res in _bundle_resources(archive, member):
            url = _v(res, "url")
            if tag == "CodeSystem":
                codes: list = []
                _concepts(res, codes)
                systems.setdefault(url, codes if _v(res, "content") == "complete" else None)
            elif tag == "ValueSet":
                valuesets.setdefault(url, res.find(NS + "compose"))
    return systems, valuesets


def expand(url: str, systems: dict, valuesets: dict, seen: frozenset = frozenset()) -> list | None:
    """The codes of value set ``url`` (None when it needs a code system this package does not ship,
    a filter, or is otherwise not enumerable: such bindings are left to HAPI's validator)."""
    compose = valuesets.get(url)
    if compose is None or url in seen:
        return None
    result: set = set()
    for part, sign in (("include", 1), ("exclude", -1)):
        for inc in compose.findall(NS + part):
            if inc.find(NS + "filter") is not None:
                return None
            codes: set | None = None
            system = _v(inc, "system")
            listed = [_v(c, "code") for c in inc.findall(NS + "concept")]
            if system is not None:
                if listed:
                    codes = set(listed)
                elif systems.get(system) is not None:
                    codes = set(systems[system])
                else:
                    return None
            for imported in inc.findall(NS + "valueSet"):
                sub = expand(imported.get("value").split("|")[0], systems, valuesets, seen | {url})
                if sub is None:
                    return None
                codes = set(sub) if codes is None else codes & set(sub)
            if codes is None:
                return None
            result = result | codes if sign > 0 else result - codes
    return sorted(result)


def build(jar: Path, version: str) -> dict:
    with zipfile.ZipFile(jar) as archive:
        types, primitives = structure_definitions(archive)
        systems, valuesets = terminology(archive)
    bound = sorted({e[4] for t in types.values() for e in t["elements"] if e[4]})
    expansions, unexpanded = {}, []
    for url in bound:
        codes = expand(url, systems, valuesets)
        if codes:
            expansions[url] = codes
        else:
            unexpanded.append(url)
    return {
        "fhirVersion": "4.0.1",
        "source": f"{ARTIFACT}:{version} (HL7 FHIR R4 definitions, CC0)",
        "generator": "scripts/build_r4_definitions.py",
        "primitives": primitives,
        "types": types,
        "valueSets": expansions,
        "unexpandedValueSets": unexpanded,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jar", type=Path, help="path of the validation-resources jar")
    parser.add_argument("--maven-repo", type=Path, default=Path.home() / ".m2" / "repository")
    parser.add_argument("--out", type=Path, default=ROOT / "fhir_ops" / "r4" / "definitions.json")
    args = parser.parse_args(argv)
    version = pinned_hapi_version()
    jar = args.jar or locate_jar(version, args.maven_repo)
    data = build(jar, version)
    # one type per line: compact, yet a diff after a version change stays readable
    lines = [json.dumps({k: v for k, v in data.items() if k != "types"}, sort_keys=True, separators=(",", ":"))[:-1]
             + ',"types":{']
    names = sorted(data["types"])
    for i, name in enumerate(names):
        lines.append(json.dumps(name) + ":" + json.dumps(data["types"][name], separators=(",", ":"))
                     + ("," if i < len(names) - 1 else ""))
    lines.append("}}")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {len(names)} types, {len(data['valueSets'])} value sets expanded, "
          f"{len(data['unexpandedValueSets'])} left to HAPI: {', '.join(data['unexpandedValueSets'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
