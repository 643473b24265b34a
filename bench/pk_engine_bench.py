"""PK engine benchmark: event-driven core (Numba kernel and numpy path) vs superposition vs R deSolve.

10^4 participants x 365 days.

Regimens: once-daily oral 1-compartment, once-daily oral 2-compartment, and twice-daily oral
1-compartment with 20 % of doses missed at random. Throughput is participant-years per second on
one core; superposition and deSolve run on a sample of participants in the same run, and the
same participants are compared value by value. Writes bench/results/pk_engine_bench.json.
"""
import os

# one core: must be set before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# a fresh Numba cache, so the first call measures a real compilation (a second process then loads it)
_NUMBA_CACHE = tempfile.mkdtemp(prefix="pk-bench-numba-")
os.environ["NUMBA_CACHE_DIR"] = _NUMBA_CACHE

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402
from inference.dosing import regimen, with_missed  # noqa: E402
from inference import pk_kernel  # noqa: E402
from inference.pk import OneCompartment, TwoCompartment, _superposition_concentration, concentration  # noqa: E402

DAYS = 365
DESOLVE_RTOL, DESOLVE_ATOL = 1e-10, 1e-12

R_SCRIPT = r"""
suppressMessages(library(deSolve))
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]; rtol <- as.numeric(args[2]); atol <- as.numeric(args[3])
par <- read.csv(file.path(dir, "params.csv"))
dos <- read.csv(file.path(dir, "doses.csv"))
out_t <- scan(file.path(dir, "times.txt"), quiet = TRUE)
two <- "q" %in% names(par)
rhs1 <- function(t, y, p) list(c(-p[["ka"]] * y[1], p[["ka"]] * y[1] - p[["cl"]] / p[["v"]] * y[2]))
rhs2 <- function(t, y, p) {
  c1 <- y[2] / p[["v"]]; c2 <- y[3] / p[["v2"]]
  list(c(-p[["ka"]] * y[1], p[["ka"]] * y[1] - p[["cl"]] * c1 - p[["q"]] * (c1 - c2), p[["q"]] * (c1 - c2)))
}
res <- vector("list", nrow(par))
cpu <- function() { pt <- proc.time(); pt[["user.self"]] + pt[["sys.self"]] }
start <- cpu()
for (i in seq_len(nrow(par))) {
  p <- unlist(par[i, ])
  d <- dos[dos$id == par$id[i] & dos$amt > 0, ]
  ev <- data.frame(var = "depot", time = d$time + p[["tlag"]], value = p[["f"]] * d$amt, method = "add")
  y0 <- if (two) c(depot = 0, central = 0, periph = 0) else c(depot = 0, central = 0)
  tt <- sort(unique(c(0, out_t, ev$time)))
  sol <- ode(y0, tt, if (two) rhs2 else rhs1, p, method = "lsoda", events = list(data = ev),
             rtol = rtol, atol = atol)
  keep <- match(out_t, sol[, "time"])
  res[[i]] <- data.frame(id = par$id[i], time = out_t, conc = sol[keep, "central"] / p[["v"]])
}
elapsed <- cpu() - start
write.csv(do.call(rbind, res), file.path(dir, "conc.csv"), row.names = FALSE)
cat(sprintf("%.6f\n", elapsed), file = file.path(dir, "elapsed.txt"))
cat(as.character(packageVersion("deSolve")), "\n", file = file.path(dir, "version.txt"))
"""


def ensure_r(packages=("r-base-core", "r-cran-desolve")) -> str | None:
    """Install R and deSolve from Debian when missing; the R version string, or None if impossible."""
    def ready():
        return shutil.which("Rscript") and subprocess.run(
            ["Rscript", "-e", "suppressMessages(library(deSolve))"], capture_output=True).returncode == 0
    if not ready() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                       capture_output=True)
    if not ready():
        return None
    return subprocess.run(["Rscript", "-e", "cat(R.version.string)"], capture_output=True,
                          text=True).stdout.strip()


def population(n: int, rng: np.random.Generator, two: bool) -> dict:
    """Log-normal inter-individual variability around typical oral small-molecule values."""
    def ln(typical, cv):
        return typical * np.exp(cv * rng.standard_normal(n))
    p = dict(cl=ln(5.0, 0.3), v=ln(50.0, 0.2), ka=ln(1.0, 0.4), tlag=ln(0.5, 0.3), f=np.full(n, 0.9))
    if two:
        p.update(q=ln(8.0, 0.3), v2=ln(80.0, 0.2))
    return p


def scenarios(n: int, rng: np.random.Generator) -> dict:
    daily_out = np.arange(DAYS) * 24.0 + 2.0  # one reading a day, 2 h after the morning dose
    return {
        "1-cmt oral once daily": (population(n, rng, False), regimen(100.0, 24.0, DAYS), daily_out),
        "2-cmt oral once daily": (population(n, rng, True), regimen(100.0, 24.0, DAYS), daily_out),
        "1-cmt oral twice daily, 20% missed": (
            population(n, rng, False),
            with_missed(regimen(50.0, 12.0, 2 * DAYS), rng.random((n, 2 * DAYS)) < 0.2), daily_out),
    }


def make_model(p: dict, rows=slice(None)):
    sub = {k: v[rows] for k, v in p.items()}
    return (TwoCompartment if "q" in p else OneCompartment)(**sub)


def sub_doses(doses, rows):
    if doses.n == 1:
        return doses
    return doses.replace(times=doses.times[rows], amounts=doses.amounts[rows],
                         durations=doses.durations[rows])


def best_of(fn, repeats: int):
    """Best CPU time of ``repeats`` calls: CPU, not wall, because other jobs share the cores
    (R's side is timed the same way, user + system time inside the R process)."""
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def max_rel(a, b) -> float:
    scale = np.max(np.abs(b))
    mask = np.abs(b) > 1e-9 * scale
    return float(np.max(np.abs(a[mask] - b[mask]) / np.abs(b[mask])))


def run_desolve(p: dict, doses, times, rows: np.ndarray):
    """Integrate the sample in R; returns (CPU seconds timed inside R, concentrations, version)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        names = list(p)
        with open(d / "params.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", *names])
            for i in rows:
                w.writerow([int(i), *(repr(float(p[k][i])) for k in names)])
        rec = doses.broadcast(int(max(rows)) + 1) if doses.n == 1 else doses
        with open(d / "doses.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "time", "amt"])
            for i in rows:
                for t, a in zip(rec.times[i], rec.amounts[i]):
                    w.writerow([int(i), repr(float(t)), repr(float(a))])
        (d / "times.txt").write_text("\n".join(repr(float(t)) for t in times))
        (d / "run.R").write_text(R_SCRIPT)
        subprocess.run(["Rscript", str(d / "run.R"), str(d), str(DESOLVE_RTOL), str(DESOLVE_ATOL)],
                       check=True, capture_output=True)
        elapsed = float((d / "elapsed.txt").read_text())
        conc = np.loadtxt(d / "conc.csv", delimiter=",", skiprows=1, usecols=2).reshape(len(rows), len(times))
        version = (d / "version.txt").read_text().strip()
    return elapsed, conc, version


def numpy_floor(n: int, days: int, repeats: int) -> float:
    """CPU seconds of the bare per-day loop the 1-cmt once-daily core runs: 8 in-place numpy passes over
    ``n`` doubles per day (decay and absorption into the central mode: 3, depot decay 1, dose 1, read
    the output: 3), with nothing else. What the core can at best reach with one numpy pass per
    operation; the rest of its time is bookkeeping."""
    rng = np.random.default_rng(0)
    e, g, ea, er, gr = (rng.random(n) for _ in range(5))
    mode, depot, tmp, out = np.zeros(n), np.zeros(n), np.empty(n), np.empty((days, n))

    def loop():
        for j in range(days):
            np.multiply(mode, e, out=mode)
            np.multiply(g, depot, out=tmp)
            np.add(mode, tmp, out=mode)
            np.multiply(depot, ea, out=depot)
            np.add(depot, 100.0, out=depot)
            row = out[j]
            np.multiply(er, mode, out=row)
            np.multiply(gr, depot, out=tmp)
            np.add(row, tmp, out=row)
    return best_of(loop, repeats)[0]


def gpu_path(model, doses, times, n: int, core: np.ndarray, repeats: int) -> dict:
    """The shared-grid loop on CuPy (``TRIALTWIN_PK_KERNEL=cupy``): wall-clock participant-years/s, the
    copy back to the host included, and agreement with the CPU core; "not measured" without CuPy and a
    CUDA device (the reason recorded)."""
    os.environ["TRIALTWIN_PK_KERNEL"] = "cupy"
    try:
        pk_kernel.array_namespace_wanted()
    except RuntimeError as exc:
        del os.environ["TRIALTWIN_PK_KERNEL"]
        return {"measured": False, "why": f"not measured: {exc}"}
    try:
        import cupy

        concentration(model, doses, times)  # first call: CUDA context, kernels compiled by CuPy
        best, out = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = concentration(model, doses, times)  # ends with the copy to the host: synchronized
            best = min(best, time.perf_counter() - t0)
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    finally:
        del os.environ["TRIALTWIN_PK_KERNEL"]
    return {"measured": True, "device": device.decode() if isinstance(device, bytes) else str(device),
            "cupy": cupy.__version__, "wall_seconds": best,
            "participant_years_per_s": n * DAYS / 365.0 / best,
            "max_rel_difference_vs_cpu_core": max_rel(out, core)}


def kernel_compilation() -> dict:
    """Compile the kernel in this process (fresh cache), then time loading it from the cache in a new one."""
    if not pk_kernel.kernel_wanted():
        return {"kernel": "numpy (numba not importable or TRIALTWIN_PK_KERNEL=numpy)"}
    pk_kernel._compile()
    info = pk_kernel.kernel_info()
    import numba
    load = subprocess.run([sys.executable, "-c", "from inference import pk_kernel; pk_kernel._compile(); "
                           "print(pk_kernel.kernel_info()['compile_seconds'])"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    return {"kernel": "numba", "numba": numba.__version__,
            "compile_seconds_first_use": info["compile_seconds"],
            "load_seconds_from_cache_new_process": float(load.stdout.strip()) if load.returncode == 0 else None,
            "cache": info["cache"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000, help="participants for the new core")
    ap.add_argument("--superposition-sample", type=int, default=200)
    ap.add_argument("--desolve-sample", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pk_engine_bench.json"))
    args = ap.parse_args()

    r_version = ensure_r()
    rng = np.random.default_rng(20261202)
    results = {"machine": describe(("numpy", "scipy", "numba"), r=r_version, threads="1 (OMP/OPENBLAS/MKL)",
                                   note="shared 2-core VM with other jobs running: absolute rates are "
                                        "noisy; ratios come from the same run"),
               "participants": args.n, "days": DAYS,
               "timing": "best CPU time (user + system) of the computation only; R start-up and "
                         "file exchange excluded",
               "outputs": "one concentration a day, 2 h after the morning dose",
               "desolve_tolerances": {"rtol": DESOLVE_RTOL, "atol": DESOLVE_ATOL, "method": "lsoda",
                                      "doses": "events (method add) at dose time + lag"},
               "scenarios": {}}
    results["kernel"] = kernel_compilation()
    print(f"kernel: {results['kernel']}")
    years = DAYS / 365.0
    for name, (p, doses, times) in scenarios(args.n, rng).items():
        model = make_model(p)
        core_s, core = best_of(lambda: concentration(model, doses, times), args.repeats)
        core_rate = args.n * years / core_s
        os.environ["TRIALTWIN_PK_KERNEL"] = "numpy"
        try:
            np_s, np_out = best_of(lambda: concentration(model, doses, times), args.repeats)
        finally:
            del os.environ["TRIALTWIN_PK_KERNEL"]
        np_rate = args.n * years / np_s

        k = min(args.superposition_sample, args.n)
        rows = slice(0, k)
        sup_s, sup = best_of(lambda: _superposition_concentration(make_model(p, rows), sub_doses(doses, rows),
                                                                  times), 1)
        sup_rate = k * years / sup_s
        entry = {
            "core": results["kernel"]["kernel"],
            "core_cpu_seconds": core_s, "core_participant_years_per_s": core_rate,
            "numpy_path_cpu_seconds": np_s, "numpy_path_participant_years_per_s": np_rate,
            "core_vs_numpy_path_speedup": core_rate / np_rate,
            "max_rel_difference_core_vs_numpy_path": max_rel(core, np_out),
            "superposition_sample": k, "superposition_cpu_seconds": sup_s,
            "superposition_participant_years_per_s": sup_rate,
            "core_vs_superposition_speedup": core_rate / sup_rate,
            "max_rel_difference_core_vs_superposition": max_rel(core[:k], sup),
        }
        entry["gpu"] = gpu_path(model, doses, times, args.n, core, args.repeats)
        print(f"  GPU (CuPy): {entry['gpu'].get('participant_years_per_s', entry['gpu'].get('why'))}")
        if name == "1-cmt oral once daily":
            floor_s = numpy_floor(args.n, DAYS, args.repeats)
            entry.update({"numpy_floor_cpu_seconds": floor_s,
                          "numpy_floor_participant_years_per_s": args.n * years / floor_s,
                          "numpy_floor": "the bare loop of 8 in-place numpy passes over the participants per day, "
                                         "timed in the same run (see numpy_floor in the script)"})
            print(f"  numpy floor (8 passes/day, nothing else): {args.n * years / floor_s:,.0f} participant-years/s")
        print(f"{name}: core {core_rate:,.0f} participant-years/s ({core_s:.3f} s for {args.n}); numpy path "
              f"{np_rate:,.0f}/s ({core_rate / np_rate:.2f}x, max rel diff "
              f"{entry['max_rel_difference_core_vs_numpy_path']:.1e}); "
              f"superposition {sup_rate:,.0f}/s ({core_rate / sup_rate:,.0f}x); "
              f"max rel diff {entry['max_rel_difference_core_vs_superposition']:.1e}")
        if r_version:
            sample = np.arange(min(args.desolve_sample, args.n))
            r_s, r_conc, r_pkg = run_desolve(p, doses, times, sample)
            r_rate = sample.size * years / r_s
            entry.update({"desolve_sample": int(sample.size), "desolve_cpu_seconds_in_r": r_s,
                          "desolve_participant_years_per_s": r_rate,
                          "core_vs_desolve_speedup": core_rate / r_rate,
                          "max_rel_difference_core_vs_desolve": max_rel(core[sample], r_conc),
                          "desolve_version": r_pkg})
            print(f"  deSolve {r_rate:,.2f} participant-years/s ({r_s:.2f} s in R for {sample.size}); "
                  f"core/deSolve {core_rate / r_rate:,.0f}x; max rel diff "
                  f"{entry['max_rel_difference_core_vs_desolve']:.1e}")
        else:
            entry["desolve"] = "not measured: R/deSolve could not be installed"
        results["scenarios"][name] = entry
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(_NUMBA_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
