"""Model registry: listing, metadata completeness, checksum verification of the committed and altered files."""
import json
import shutil

import pytest

from inference.registry import REQUIRED_KEYS, ChecksumMismatch, ModelRegistry, default_registry, sha256_file

pytestmark = pytest.mark.unit


@pytest.fixture
def copied(tmp_path):
    src = default_registry().latest("dropout")
    for path in src.onnx_path.parent.glob(f"dropout-{src.version}.*"):
        shutil.copy(path, tmp_path / path.name)
    return ModelRegistry(tmp_path), src


def test_committed_models_verify():
    entries = default_registry().verify_all()
    assert [(e.name, e.version) for e in entries] == [("dropout", "1.0.1"), ("withdrawal", "1.0.0")]
    meta = entries[0].metadata
    assert set(REQUIRED_KEYS) <= set(meta)
    assert meta["sha256"] == sha256_file(entries[0].onnx_path)
    assert {"scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy"} <= set(meta["libraries"])
    assert meta["code"]["module"] == "inference.training.dropout"
    assert all(len(h) == 64 for h in meta["code"]["source_sha256"].values())
    for name in meta["files"].values():
        assert (entries[0].onnx_path.parent / name).is_file()


def test_altered_model_file_is_refused_with_a_clear_error(copied):
    registry, _ = copied
    entry = registry.get("dropout")
    data = bytearray(entry.onnx_path.read_bytes())
    data[-1] ^= 0xFF
    entry.onnx_path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=r"dropout 1\.0\.1: dropout-1\.0\.1\.onnx has sha256 [0-9a-f]{64}, "
                                               r"metadata dropout-1\.0\.1\.json records"):
        entry.load(force_cpu=True)
    with pytest.raises(ChecksumMismatch):
        registry.verify_all()


def test_latest_version_and_unknown_names(copied):
    registry, src = copied
    meta = dict(src.metadata, version="1.10.0")
    shutil.copy(src.onnx_path, registry.directory / "dropout-1.10.0.onnx")
    (registry.directory / "dropout-1.10.0.json").write_text(json.dumps(meta))
    assert registry.latest("dropout").version == "1.10.0"  # numeric, not lexical, ordering
    assert registry.get("dropout", "1.0.1").version == "1.0.1"
    with pytest.raises(KeyError, match="no model 'risk'.*known: dropout-1.0.1, dropout-1.10.0"):
        registry.get("risk")
    with pytest.raises(KeyError, match="dropout-9.9.9"):
        registry.get("dropout", "9.9.9")


def test_inconsistent_entries_are_reported(copied):
    registry, _ = copied
    (registry.directory / "dropout-1.0.1.onnx").unlink()
    with pytest.raises(ValueError, match="model file dropout-1.0.1.onnx is missing"):
        registry.entries()
    (registry.directory / "dropout-1.0.1.json").unlink()
    (registry.directory / "other-2.0.0.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(ValueError, match="lacks"):
        registry.entries()
