"""What every benchmark records about the machine it ran on (results are only comparable with it).

Shared by the scripts in bench/ so each result file describes its machine the same way.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def library_versions(packages) -> dict:
    """Installed versions of ``packages`` (None for a package that is not installed)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe(packages=(), **extra) -> dict:
    """Platform, CPU, cores, Python, load average and library versions, plus ``extra`` keys."""
    return {"platform": platform.platform(), "cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
            "python": platform.python_version(), "load_average": os.getloadavg(),
            "libraries": library_versions(packages), **extra}
