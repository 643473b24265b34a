"""``trialtwin load``: load transaction/batch Bundles, single resources, NDJSON files and bulk-data manifests.

Into the embedded store of a data directory, or into any FHIR server by URL; NDJSON goes in
transactions of ``--batch-size`` lines (in ``--workers`` processes) so a bad line rejects its batch
only, and says which. Every NDJSON line is written with PUT at its id, or at an id derived from its
content when it has none, and each batch is journaled in the same transaction: a load killed at any
point is resumed by running it again, without duplicates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import unquote, urlparse

from fhir_ops.commands.serve import DEFAULT_DATA_DIR
from fhir_ops.errors import FhirError, InvalidRequest


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("load", help="load Bundles, resources and NDJSON files")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="*.json (a transaction/batch/collection Bundle, one resource, a Bulk Data export "
                             "manifest or $import Parameters) or *.ndjson")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None,
                       help=f"embedded store directory (default {DEFAULT_DATA_DIR})")
    where.add_argument("--url", help="base URL of a running FHIR server (e.g. http://127.0.0.1:8080/fhir)")
    parser.add_argument("--format", choices=("fhir", "nonmem", "omop"), default="fhir",
                        help="fhir (default): Bundles, resources, NDJSON; omop: a directory of OMOP CDM v5.4 CSV "
                             "tables or a SQLite database of them (docs/connectors.md); nonmem: NONMEM-format CSV data sets "
                             "(needs --mapping)")
    parser.add_argument("--mapping", metavar="MAP.json",
                        help="with --format nonmem: what compartments and columns mean (codes, units, study)")
    parser.add_argument("--batch-size", type=int, default=1000, help="NDJSON lines per transaction (default 1000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes loading NDJSON batches in parallel (default 1; e.g. the number of cores)")
    parser.add_argument("--token", default=os.environ.get("TRIALTWIN_TOKEN"),
                        help="with --url: a SMART access token sent as 'Authorization: Bearer' (default "
                             "$TRIALTWIN_TOKEN), e.g. a backend-services token with system/*.cruds")
    return parser


@dataclass
class FileReport:
    """What happened to one file."""

    path: str
    loaded: int = 0
    failed: int = 0
    error: str | None = None
    skipped_batches: int = 0
    skipped_lines: int = 0
    inputs: list[str] = field(default_factory=list)


class LoadError(Exception):
    """A file (or part of it) could not be loaded; the message says where and why."""


def _entry(resource: dict) -> dict:
    # resources with an id keep it (PUT), so loading a file twice does not duplicate it
    if resource.get("id"):
        request = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    else:
        request = {"method": "POST", "url": resource["resourceType"]}
    return {"resource": resource, "request": request}


def _check_resource(value, where: str) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise LoadError(f"{where}: not a FHIR resource (a JSON object with resourceType)")
    return value


def bundles_of_json(path: str, data) -> Iterator[tuple[str, dict]]:
    """A parsed ``.json`` file (not a manifest) as (description, Bundle to submit) pairs."""
    resource = _check_resource(data, "the file")
    if resource["resourceType"] == "Bundle" and resource.get("type") in ("transaction", "batch"):
        yield f"{resource['type']} Bundle", resource
    elif resource["resourceType"] == "Bundle" and resource.get("type") in ("collection", "searchset"):
        entries = [_entry(_check_resource(e.get("resource"), f"entry[{i}]"))
                   for i, e in enumerate(resource.get("entry") or [])]
        yield f"{resource['type']} Bundle loaded as a transaction", {
            "resourceType": "Bundle", "type": "transaction", "entry": entries}
    elif resource["resourceType"] == "Bundle":
        raise LoadError(f"a Bundle of type {resource.get('type')!r} cannot be loaded "
                        "(use transaction, batch or collection)")
    else:
        yield f"{resource['resourceType']}", {"resourceType": "Bundle", "type": "transaction",
                                              "entry": [_entry(resource)]}


def content_id(resource: dict) -> str:
    """A FHIR id derived from a resource's content: the same JSON (keys in any order) gives the same id.

    Used for NDJSON lines without an id, so loading a file twice (or resuming a crashed load) stores
    each such resource once.

    Examples
    --------
    >>> content_id({"resourceType": "Patient", "gender": "male"}) == content_id({"gender": "male",
    ...                                                                          "resourceType": "Patient"})
    True
    >>> len(content_id({"resourceType": "Patient"}))
    40
    """
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate in a string still gets an id (validation judges the resource)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:40]


@dataclass
class Batch:
    """Consecutive NDJSON lines loaded in one transaction; ``key`` is a hash of their bytes (the journal key)."""

    source: str
    first_line: int
    last_line: int
    lines: list[tuple[int, bytes]]
    key: str
    expected_type: str | None = None

    @property
    def part(self) -> str:
        return f"lines {self.first_line}-{self.last_line}"


def ndjson_batches(path: str, batch_size: int, expected_type: str | None = None) -> Iterator[Batch]:
    """Split an NDJSON file into batches of ``batch_size`` non-blank lines (read lazily).

    The key of a batch hashes its lines' bytes and the declared type: the same lines give the same
    key whatever the file is called, so the journal recognises a batch that is already stored.
    """
    lines: list[tuple[int, bytes]] = []
    digest = hashlib.blake2b(digest_size=20, person=b"tt-load-batch")
    digest.update((expected_type or "").encode() + b"\n")
    number = 0
    source = os.path.abspath(path)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            lines.append((number, raw))
            digest.update(raw.rstrip(b"\r\n") + b"\n")
            if len(lines) >= batch_size:
                yield Batch(source, lines[0][0], number, lines, digest.hexdigest(), expected_type)
                lines = []
                digest = hashlib.blake2b(digest_size=20, person=b"tt-load-batch")
                digest.update((expected_type or "").encode() + b"\n")
    if lines:
        yield Batch(source, lines[0][0], number, lines, digest.hexdigest(), expected_type)


def _ndjson_entry(resource: dict) -> dict:
    # PUT at the line's id, or at its content id: loading the same line twice never makes two resources
    rid = resource.get("id") or content_id(resource)
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"}}


def batch_bundle(batch: Batch) -> dict:
    """Parse a batch's lines into one transaction Bundle; ``LoadError`` names the first bad line."""
    entries = []
    for number, raw in batch.lines:
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadError(f"line {number}: invalid JSON: {exc}") from None
        resource = _check_resource(value, f"line {number}")
        if batch.expected_type and resource["resourceType"] != batch.expected_type:
            raise LoadError(f"line {number}: a {resource['resourceType']} in an input the manifest declares as "
                            f"{batch.expected_type}")
        entries.append(_ndjson_entry(resource))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass
class BatchResult:
    """What happened to one batch: resources stored, failed entries, or the error that rejected it."""

    part: str
    loaded: int = 0
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    unmapped: object = None  # a worker's UnmappedReport for this batch, merged into the parent's


def load_batch(target, batch: Batch) -> BatchResult:
    """Load one batch into ``target`` (journaled with the data where the target keeps a journal)."""
    result = BatchResult(batch.part)
    try:
        bundle = batch_bundle(batch)
        journal = {"batch": batch.key, "source": batch.source, "first_line": batch.first_line,
                   "last_line": batch.last_line}
        response = target.submit(bundle, journal=journal)
        result.failures = _failed_entries(response)
        result.loaded = len(bundle["entry"]) - len(result.failures)
    except LoadError as exc:
        message = str(exc)
        result.error = message if message.startswith("line") else f"{batch.part}: {message}"
    except FhirError as exc:
        result.error = f"{batch.part} rejected, nothing of it stored: {exc.message}"
    return result


def _failed_entries(response: dict) -> list[str]:
    failures = []
    for i, entry in enumerate(response.get("entry") or []):
        status = ((entry or {}).get("response") or {}).get("status", "")
        if status and not status.startswith("2"):
            outcome = (entry["response"].get("outcome") or {}).get("issue") or [{}]
            failures.append(f"entry[{i}]: {status} {outcome[0].get('diagnostics', '')}".rstrip())
    return failures


class StoreTarget:
    """Submit Bundles to the embedded store of a data directory."""

    def __init__(self, data_dir: str) -> None:
        from fhir_ops.app import create_app, get_store

        os.makedirs(data_dir, exist_ok=True)
        # In-process store access, never served over HTTP: no tokens to check.
        self.app = create_app({"DATA_DIR": os.path.abspath(data_dir), "AUTH_MODE": "open"})
        with self.app.app_context():
            self.store = get_store()
        self.where = os.path.abspath(data_dir)
        from terminology.harmonize import UnmappedReport

        self.unmapped = UnmappedReport()

    def submit(self, bundle: dict, journal: dict | None = None) -> dict:
        # the same harmonization as the REST layer: standard codings, canonical units, unmapped codes counted
        from terminology.harmonize import attach_outcomes, harmonize_bundle
        from terminology.workflow import active_harmonizer

        bundle, warnings = harmonize_bundle(bundle, harmonizer=active_harmonizer(self.store), report=self.unmapped)
        if bundle["type"] == "batch":
            return attach_outcomes(self.store.batch(bundle), warnings)
        if journal is not None and hasattr(self.store, "loaded_batches"):
            return attach_outcomes(self.store.transaction(bundle, journal=journal), warnings)
        return attach_outcomes(self.store.transaction(bundle), warnings)

    def loaded_batches(self) -> set[str]:
        """Journal keys of the NDJSON batches already stored (empty for a store without a journal)."""
        loaded = getattr(self.store, "loaded_batches", None)
        return loaded() if loaded is not None else set()

    def close(self) -> None:
        self.store.close()


class HttpTarget:
    """Submit Bundles to a FHIR server's base URL."""

    def __init__(self, url: str, token: str | None = None) -> None:
        import requests

        self.url = url.rstrip("/")
        self.where = self.url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, bundle: dict, journal: dict | None = None) -> dict:
        # a remote server keeps no load journal: a rerun re-sends every batch, which PUT makes harmless
        import requests

        try:
            response = self.session.post(self.url, data=json.dumps(bundle),
                                         headers={"Content-Type": "application/fhir+json",
                                                  "Accept": "application/fhir+json"}, timeout=600)
        except requests.RequestException as exc:
            raise LoadError(f"cannot reach {self.url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            issues = body.get("issue") or [{}]
            detail = "; ".join(i.get("diagnostics", "") for i in issues if i.get("diagnostics")) or response.reason
            raise LoadError(f"HTTP {response.status_code}: {detail}")
        return body

    def loaded_batches(self) -> set[str]:
        return set()

    def close(self) -> None:
        self.session.close()


def manifest_inputs(path: str, data) -> list[tuple[str, str | None]] | None:
    """The NDJSON inputs a bulk-data manifest names, as (local path, declared type); None if not a manifest.

    Two shapes are read: a FHIR Bulk Data export manifest (``{"output": [{"type", "url"}, ...]}``) and
    the Parameters of a ``$import`` request (``input`` parameters with ``type`` and ``url`` parts). URLs
    must be local: ``file://`` URLs or paths relative to the manifest; nothing is downloaded.
    """
    if not isinstance(data, dict):
        return None
    if data.get("resourceType") == "Parameters":
        params = data.get("parameter") or []
        if not any(isinstance(p, dict) and p.get("name") == "input" for p in params):
            return None
        items = []
        for p in params:
            if isinstance(p, dict) and p.get("name") == "input":
                parts = {q.get("name"): q for q in p.get("part") or [] if isinstance(q, dict)}
                url = next((v for k, v in (parts.get("url") or {}).items() if k.startswith("value")), None)
                rtype = next((v for k, v in (parts.get("type") or {}).items() if k.startswith("value")), None)
                items.append({"url": url, "type": rtype})
    elif "resourceType" not in data and isinstance(data.get("output"), list):
        items = data["output"]
    else:
        return None
    base = os.path.dirname(os.path.abspath(path))
    inputs = []
    for i, item in enumerate(items):
        url = item.get("url") if isinstance(item, dict) else None
        if not isinstance(url, str) or not url:
            raise LoadError(f"manifest input {i} has no url")
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise LoadError(f"manifest input {i}: {url} is remote; download it and name the local file "
                            "(nothing is fetched)")
        if parsed.scheme not in ("", "file"):
            raise LoadError(f"manifest input {i}: unsupported URL scheme {parsed.scheme!r}")
        local = unquote(parsed.path) if parsed.scheme == "file" else url
        rtype = item.get("type")
        inputs.append((os.path.join(base, local), rtype if isinstance(rtype, str) else None))
    return inputs


def _progress(path: str, message: str) -> None:
    print(f"{os.path.basename(path)}: {message}", file=sys.stderr, flush=True)


def _collect(report: FileReport, path: str, result: BatchResult) -> bool:
    """Add a batch result to the report, print its progress line; False when the load must stop."""
    report.loaded += result.loaded
    report.failed += len(result.failures)
    if result.error:
        report.error = result.error
        _progress(path, f"{result.part}: NOT stored: {result.error}")
        return False
    if result.failures:
        shown = "; ".join(result.failures[:3]) + (f"; and {len(result.failures) - 3} more"
                                                  if len(result.failures) > 3 else "")
        report.error = f"{result.part}: {len(result.failures)} entries failed: {shown}"
    _progress(path, f"{result.part} stored ({result.loaded} resources)")
    return True


_WORKER_TARGET = None


def _worker_init(data_dir: str | None, url: str | None, token: str | None) -> None:
    from fhir_ops.gc_tuning import tune_for_serving

    global _WORKER_TARGET
    _WORKER_TARGET = HttpTarget(url, token) if url else StoreTarget(data_dir)
    tune_for_serving()  # a worker process lives for the whole load, like a server


def _worker_load(batch: Batch) -> BatchResult:
    result = load_batch(_WORKER_TARGET, batch)
    if getattr(_WORKER_TARGET, "unmapped", None) is not None:
        from terminology.harmonize import UnmappedReport

        result.unmapped, _WORKER_TARGET.unmapped = _WORKER_TARGET.unmapped, UnmappedReport()
    return result


def _merge_unmapped(into, other) -> None:
    if into is None or other is None:
        return
    for key, n in other.counts.items():
        into.counts[key] += n
        if key in other.displays:
            into.displays.setdefault(key, other.displays[key])
        into.resource_types.setdefault(key, set()).update(other.resource_types.get(key, ()))


class Loader:
    """Loads files into one target; NDJSON batches optionally in a pool of worker processes.

    Each worker opens its own target (its own SQLite connections, or HTTP session); SQLite serializes
    their transactions (``BEGIN IMMEDIATE``), while parsing, validation, harmonization and index
    extraction of the next batches run in parallel with the current commit.
    """

    def __init__(self, target, workers: int = 1, batch_size: int = 1000, spec: tuple = (None, None, None)) -> None:
        self.target, self.workers, self.batch_size, self.spec = target, workers, batch_size, spec
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            import multiprocessing

            # spawn: the workers open their own store; never a forked copy of this process's connections
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=self.spec)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def load_ndjson(self, path: str, report: FileReport, expected_type: str | None = None) -> None:
        done = self.target.loaded_batches()

        def todo():  # the file's batches that no earlier run stored
            run: list[Batch] = []  # consecutive stored batches, announced when the run ends
            for batch in ndjson_batches(path, self.batch_size, expected_type):
                if batch.key in done:
                    report.skipped_batches += 1
                    report.skipped_lines += len(batch.lines)
                    run.append(batch)
                    continue
                if run:
                    _progress(path, f"lines {run[0].first_line}-{run[-1].last_line} already stored by an earlier "
                                    f"run ({len(run)} batches), skipped")
                    run = []
                yield batch

        batches = todo()
        if self.workers <= 1:
            for batch in batches:
                if not _collect(report, path, load_batch(self.target, batch)):
                    break
        else:
            first = next(batches, None)
            second = next(batches, None) if first is not None else None
            if second is None:  # at most one batch to load: no pool needed
                if first is not None:
                    _collect(report, path, load_batch(self.target, first))
            else:
                self._parallel(path, report, [first, second], batches)
        if report.skipped_batches:
            _progress(path, f"{report.skipped_batches} batches ({report.skipped_lines} lines) already stored "
                            "by an earlier run, skipped")

    def _parallel(self, path: str, report: FileReport, first: list[Batch], rest: Iterator[Batch]) -> None:
        pool = self._pool()
        batches = iter(first)
        in_flight: set = set()
        stop = False
        while True:
            # two batches per worker in flight: enough to overlap parsing with commits, bounded memory
            while not stop and len(in_flight) < 2 * self.workers:
                batch = next(batches, None) or next(rest, None)
                if batch is None:
                    break
                in_flight.add(pool.submit(_worker_load, batch))
            if not in_flight:
                return
            finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()
                _merge_unmapped(getattr(self.target, "unmapped", None), result.unmapped)
                if not _collect(report, path, result):
                    stop = True  # let the batches in flight finish; hand out no more

    def load_file(self, path: str) -> FileReport:
        """Load one file; errors are caught and described in the report."""
        report = FileReport(path)
        try:
            os.path.getsize(path)
        except OSError as exc:
            report.error = f"cannot read: {exc.strerror}"
            return report
        part = "the file"
        try:
            if path.endswith(".ndjson"):
                self.load_ndjson(path, report)
                return report
            with open(path, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise LoadError(f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
            inputs = manifest_inputs(path, data)
            if inputs is not None:
                for input_path, rtype in inputs:
                    report.inputs.append(input_path)
                    if not os.path.exists(input_path):
                        raise LoadError(f"manifest input {input_path} does not exist")
                    self.load_ndjson(input_path, report, rtype)
                    if report.error:
                        return report
                return report
            for part, bundle in bundles_of_json(path, data):
                response = self.target.submit(bundle)
                failures = _failed_entries(response)
                report.failed += len(failures)
                report.loaded += len(bundle.get("entry") or []) - len(failures)
                if failures:
                    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
                    report.error = f"{part}: {len(failures)} entries failed: {shown}"
        except LoadError as exc:
            message = str(exc)
            report.error = message if message.startswith(("line", "manifest")) or part == "the file" \
                else f"{part}: {message}"
        except FhirError as exc:
            report.error = f"{part} rejected, nothing of it stored: {exc.message}"
        except OSError as exc:
            report.error = f"cannot read: {exc}"
        return report


def load_nonmem(target, path: str, mapping: dict) -> FileReport:
    """Load a NONMEM data set: the whole file is checked first (nothing stored when a row is bad),
    then the ResearchStudy, then one transaction per subject."""
    from fhir_ops.mapping import nonmem

    report = FileReport(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        report.error = f"cannot read: {exc}"
        return report
    try:
        subjects = nonmem.parse(text, mapping)
        model = _mapping_model(target, mapping)
        if model is not None:
            unit_problems = nonmem.check_units_against(mapping, model)
            if unit_problems:
                raise nonmem.NonmemError(unit_problems)
    except nonmem.NonmemError as exc:
        report.error = "nothing loaded:\n  " + "\n  ".join(exc.problems)
        return report
    bundles = [("ResearchStudy", {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": nonmem.study_resource(mapping, [s.arm for s in subjects if s.arm]),
        "request": {"method": "PUT", "url": f"ResearchStudy/{mapping['study']['id']}"}}]})]
    bundles += [(f"ID {s.id} (line {s.first_line})", nonmem.subject_bundle(s, mapping)) for s in subjects]
    for part, bundle in bundles:
        if not _submit_part(target, bundle, part, "subjects", report):
            return report
    return report


def _submit_part(target, bundle: dict, part: str, earlier: str, report) -> bool:
    """Submit one all-or-nothing part of a load; on refusal say which part and that the ``earlier`` ones
    are loaded, and return False (the load stops there)."""
    try:
        response = target.submit(bundle)
    except (LoadError, FhirError) as exc:
        report.error = f"{part}: rejected ({getattr(exc, 'message', exc)}); {earlier} before it are loaded"
        return False
    failures = _failed_entries(response)
    if failures:
        report.error = f"{part}: {'; '.join(failures[:3])}"
        return False
    report.loaded += len(bundle["entry"])
    return True


def _mapping_model(target, mapping: dict):
    """The compiled definition the mapping's study names, when the loader can resolve it: stored in the
    target's embedded store, else a shipped example of that canonical; None otherwise (a remote server's
    Library is checked when the model is used)."""
    from fhir_ops.errors import FhirError as _FhirError
    from fhir_ops.mapping import model_definition as fm
    from inference import model_definition as md

    canonical = (mapping.get("study") or {}).get("model")
    if not canonical:
        return None
    store = getattr(target, "store", None)
    if store is not None:
        try:
            return fm.definition_of_library(fm.find_library(store, canonical))
        except _FhirError:
            pass
    for name in md.shipped_names():
        model = fm.compile_definition(md.shipped_definition(name))
        if model.canonical == canonical or (model.url == canonical and "|" not in canonical):
            return model
    return None


def load_omop(target, directory: str) -> FileReport:
    """Load an OMOP CDM v5.4 directory of CSV tables or SQLite database: all tables read and checked first,
    then one transaction per person.

    Prints the rows per table and the resources per type, which must agree, and the concept ids the
    shipped vocabulary does not reach.
    """
    from collections import Counter

    from fhir_ops.mapping import omop

    report = FileReport(directory)
    try:
        tables = omop.read_tables(directory)
    except omop.OmopError as exc:
        report.error = "nothing loaded: " + "; ".join(exc.problems)
        return report
    vocab, unmapped, written = omop.Vocabulary(), omop.UnmappedConcepts(), Counter()
    try:
        for pid, bundle, per_table in omop.person_bundles(tables, vocab, unmapped):
            if not _submit_part(target, bundle, f"person_id {pid}", "persons", report):
                return report
            written.update(per_table)
    except omop.OmopError as exc:
        report.error = "nothing loaded: " + "; ".join(exc.problems)
        return report
    for table, rows in tables.items():
        target_kind = "Patient.deceased" if table == "death" else omop.TABLES[table][0]
        print(f"{directory}: {table}: {len(rows)} rows -> {written[table]} {target_kind}")
    for line in unmapped.lines():
        print(f"{directory}: unmapped concept {line}", file=sys.stderr)
    return report


def read_mapping(path: str) -> dict:
    """A NONMEM mapping file (codes, units and study of a data set); unreadable or invalid JSON is a 400."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidRequest("--batch-size must be at least 1")
    if args.workers < 1:
        raise InvalidRequest("--workers must be at least 1")
    mapping = None
    if getattr(args, "format", "fhir") == "nonmem":
        if not args.mapping:
            raise InvalidRequest("--format nonmem needs --mapping MAP.json (codes, units and study of the data set)")
        mapping = read_mapping(args.mapping)
    elif args.mapping:
        raise InvalidRequest("--mapping applies to --format nonmem")
    data_dir = os.path.abspath(args.data_dir or DEFAULT_DATA_DIR)
    token = getattr(args, "token", None)
    target = HttpTarget(args.url, token) if args.url else StoreTarget(data_dir)
    loader = Loader(target, args.workers, args.batch_size, (None if args.url else data_dir, args.url, token))
    failed = False
    try:
        for path in args.files:
            if getattr(args, "format", "fhir") == "omop":
                report = load_omop(target, path)
            else:
                report = load_nonmem(target, path, mapping) if mapping is not None else loader.load_file(path)
            skipped = (f"; {report.skipped_lines} lines already stored by an earlier run"
                       if report.skipped_lines else "")
            if report.error:
                failed = True
                print(f"{path}: ERROR: {report.error} ({report.loaded} resources loaded before/besides this"
                      f"{skipped})", file=sys.stderr)
            else:
                print(f"{path}: {report.loaded} resources loaded into {target.where}{skipped}")
        unmapped = getattr(target, "unmapped", None)
        if unmapped is not None and unmapped.counts:
            rows = unmapped.to_dict()["unmapped"]
            print(f"warning: {len(rows)} local code(s) have no standard mapping (stored as received):", file=sys.stderr)
            for row in rows[:20]:
                print(f"  {row['system']}|{row['code']}: {row['count']} coding(s) in {', '.join(row['resourceTypes'])}",
                      file=sys.stderr)
    finally:
        loader.close()
        target.close()
    return 1 if failed else 0
