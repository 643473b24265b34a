"""Participant covariates as one immutable, column-oriented value object.

Shared by the behaviour, PK and cohort modules so that every model sees the same validated arrays.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["Covariates"]

_FLOAT_FIELDS = ("weight_kg", "age_y", "egfr", "distance_km")


@dataclass(frozen=True, eq=False)
class Covariates:
    """Baseline covariates of ``n`` participants, one array of shape ``(n,)`` per covariate.

    Parameters
    ----------
    weight_kg : array_like
        Body weight in kg (> 0).
    age_y : array_like
        Age in years (> 0).
    egfr : array_like
        Estimated GFR in mL/min/1.73 m2 (> 0).
    sex_female : array_like
        1 for female, 0 for male.
    distance_km : array_like
        Travel distance from home to the trial site in km (>= 0).
    site : array_like
        Integer site index (>= 0).

    Examples
    --------
    >>> cov = Covariates(weight_kg=[70, 90], age_y=[50, 61], egfr=[90, 60],
    ...                  sex_female=[1, 0], distance_km=[5, 40], site=[0, 2])
    >>> cov.n
    2
    >>> cov.take([1]).weight_kg
    array([90.])
    """

    weight_kg: np.ndarray
    age_y: np.ndarray
    egfr: np.ndarray
    sex_female: np.ndarray
    distance_km: np.ndarray
    site: np.ndarray

    def __post_init__(self) -> None:
        arrays = {}
        for name in _FLOAT_FIELDS:
            arr = np.atleast_1d(np.asarray(getattr(self, name), dtype=float))
            if arr.ndim != 1:
                raise ValueError(f"covariate {name!r} must be one-dimensional, got shape {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"covariate {name!r} contains non-finite values")
            arrays[name] = arr
        for name in ("weight_kg", "age_y", "egfr"):
            if np.any(arrays[name] <= 0):
                raise ValueError(f"covariate {name!r} must be > 0")
        if np.any(arrays["distance_km"] < 0):
            raise ValueError("covariate 'distance_km' must be >= 0")
        sex = np.atleast_1d(np.asarray(self.sex_female))
        if not np.all(np.isin(sex, (0, 1))):
            raise ValueError("covariate 'sex_female' must contain only 0 and 1")
        site = np.atleast_1d(np.asarray(self.site))
        if site.size and (not np.all(np.equal(np.mod(site, 1), 0)) or np.any(site < 0)):
            raise ValueError("covariate 'site' must contain non-negative integers")
        arrays["sex_female"] = sex.astype(np.int8)
        arrays["site"] = site.astype(np.int64)
        sizes = {name: arr.shape for name, arr in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all covariates must have the same length, got {sizes}")
        for name, arr in arrays.items():
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def n(self) -> int:
        """Number of participants."""
        return int(self.weight_kg.shape[0])

    def take(self, index) -> "Covariates":
        """Return the covariates of the participants selected by ``index`` (slice, mask or indices)."""
        return Covariates(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def replace(self, **changes) -> "Covariates":
        """Return a validated copy with some covariates replaced."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Return the covariates as a dict of arrays (e.g. to build a feature table)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
