"""Registry of learned models on disk: ``<name>-<version>.onnx`` beside ``<name>-<version>.json`` metadata.

Lists, verifies (sha256 of the ONNX bytes against the metadata) and loads models into predictors.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelEntry", "ModelRegistry", "ChecksumMismatch", "default_registry", "DEFAULT_MODELS_DIR",
           "sha256_file"]

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / "models"
_NAME = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)-(?P<version>\d+\.\d+\.\d+)$")
REQUIRED_KEYS = ("name", "version", "sha256", "onnx_file", "feature_schema", "output", "training",
                 "validation", "libraries", "code")


class ChecksumMismatch(ValueError):
    """The ONNX file's bytes do not match the sha256 recorded in its metadata."""


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version.

    Attributes
    ----------
    name, version : str
        Identity; files are ``<name>-<version>.onnx`` / ``.json``.
    onnx_path, metadata_path : pathlib.Path
        Where the model and its metadata live.
    metadata : dict
        The parsed metadata JSON.
    """

    name: str
    version: str
    onnx_path: Path
    metadata_path: Path
    metadata: dict

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.metadata["feature_schema"])

    def verify(self) -> "ModelEntry":
        """Check the ONNX bytes against the recorded sha256; raise :class:`ChecksumMismatch` if they differ."""
        actual = sha256_file(self.onnx_path)
        expected = self.metadata["sha256"]
        if actual != expected:
            raise ChecksumMismatch(
                f"model {self.name} {self.version}: {self.onnx_path.name} has sha256 {actual}, metadata "
                f"{self.metadata_path.name} records {expected}; the file was altered or replaced - "
                "retrain with `trialtwin train` or restore it")
        return self

    def load(self, *, force_cpu: bool | None = None):
        """Verify the checksum, then return the cached :class:`inference.predictor.Predictor`."""
        from inference.predictor import load_predictor

        self.verify()
        return load_predictor(self.onnx_path, force_cpu=force_cpu, feature_names=self.feature_names)

    def summary(self) -> dict:
        """Short JSON-able description (what ``GET /models`` shows)."""
        meta = self.metadata
        return {"name": self.name, "version": self.version, "sha256": meta["sha256"],
                "output": meta["output"], "n_features": len(meta["feature_schema"]),
                "features": [f["name"] for f in meta["feature_schema"]],
                "validation": meta["validation"], "created": meta.get("created")}


class ModelRegistry:
    """The models found in one directory.

    Examples
    --------
    >>> reg = default_registry()
    >>> "dropout" in reg.names()
    True
    >>> reg.latest("dropout").verify().name
    'dropout'
    """

    def __init__(self, directory=DEFAULT_MODELS_DIR) -> None:
        self.directory = Path(directory)

    def entries(self) -> list[ModelEntry]:
        """All well-formed entries, sorted by name then version."""
        found = []
        for meta_path in sorted(self.directory.glob("*.json")):
            match = _NAME.match(meta_path.stem)
            if not match:
                continue
            metadata = json.loads(meta_path.read_text())
            missing = [k for k in REQUIRED_KEYS if k not in metadata]
            if missing:
                raise ValueError(f"{meta_path}: metadata lacks {missing}")
            if (metadata["name"], metadata["version"]) != (match["name"], match["version"]):
                raise ValueError(f"{meta_path}: metadata says {metadata['name']}-{metadata['version']}")
            onnx_path = meta_path.with_suffix(".onnx")
            if not onnx_path.is_file():
                raise ValueError(f"{meta_path}: its model file {onnx_path.name} is missing")
            found.append(ModelEntry(match["name"], match["version"], onnx_path, meta_path, metadata))
        return sorted(found, key=lambda e: (e.name, _version_key(e.version)))

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for ``name`` at ``version`` (latest when omitted); ``KeyError`` if absent."""
        candidates = [e for e in self.entries() if e.name == name]
        if version is not None:
            candidates = [e for e in candidates if e.version == version]
        if not candidates:
            known = ", ".join(f"{e.name}-{e.version}" for e in self.entries()) or "none"
            wanted = name if version is None else f"{name}-{version}"
            raise KeyError(f"no model {wanted!r} in {self.directory} (known: {known})")
        return candidates[-1]

    def latest(self, name: str) -> ModelEntry:
        return self.get(name)

    def verify_all(self) -> list[ModelEntry]:
        """Verify every entry's checksum; raise on the first mismatch."""
        return [e.verify() for e in self.entries()]


def default_registry() -> ModelRegistry:
    """The registry of the models committed with the package (``inference/models``)."""
    return ModelRegistry(DEFAULT_MODELS_DIR)
