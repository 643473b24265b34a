"""``trialtwin compile-kernels`` fills Numba's on-disk cache with every engine kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def _compile_kernels(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-m", "fhir_ops.cli", "compile-kernels", "--json"], env=env,
                          capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout)


def test_compile_kernels_writes_both_kernels_into_the_named_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    report = _compile_kernels({"NUMBA_CACHE_DIR": str(cache)})
    assert report["pk"]["kernel"] == "numba" and report["pk"]["cache"] is True
    assert report["estimation"]["kernel"] == "numba" and report["estimation"]["cache"] is True
    written = {path.name for path in cache.rglob("*") if path.suffix in (".nbi", ".nbc")}
    # one index per compiled function of each module, and its machine code beside it
    assert any(name.startswith("pk_kernel.") for name in written), written
    assert any(name.startswith("estimation_kernel._mode_search_step") for name in written), written
    assert any(name.startswith("estimation_kernel._gradient") for name in written), written
    assert {name.rsplit(".", 1)[1] for name in written} == {"nbi", "nbc"}


def test_switched_off_kernels_are_reported_and_not_compiled(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    report = _compile_kernels({"NUMBA_CACHE_DIR": str(cache), "TRIALTWIN_PK_KERNEL": "numpy",
                               "TRIALTWIN_FOCE_KERNEL": "numpy"})
    assert report == {"pk": {"kernel": "numpy"}, "estimation": {"kernel": "numpy"}}
    assert not any(cache.iterdir())
