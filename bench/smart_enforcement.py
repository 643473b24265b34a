"""Benchmark: cost of SMART enforcement in fhir_ops (token check, scopes, Patient compartment) over real HTTP.

Baseline: the same FHIR app and store in open mode, measured in the same run. Also the clinician app's patient
page (which calls $simulate, reads risk, tasks and the participant) end to end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fhir_ops.app import create_app  # noqa: E402
from fhir_ops.commands.demo import create_demo  # noqa: E402
from fhir_ops.wsgi import create_wsgi  # noqa: E402
from tests.live_server import serve  # noqa: E402
from tests.smart_app.conftest import Combined, Stack, combined_config  # noqa: E402
from tests.smart_app.helpers import UserAgent  # noqa: E402
from _machine import cpu_model

PATIENT = "tt201-p003"


def machine() -> dict:
    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "flask": version("flask"), "werkzeug": version("werkzeug"), "joserfc": version("joserfc"),
            "authlib": version("authlib"), "matplotlib": version("matplotlib"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def timed(session: requests.Session, url: str, n: int, **kw) -> dict:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = session.get(url, timeout=120, **kw)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
    samples.sort()
    return {"n": n, "median_ms": round(statistics.median(samples), 3),
            "p95_ms": round(samples[int(0.95 * (n - 1))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="requests per FHIR measurement")
    parser.add_argument("--pages", type=int, default=5, help="clinician page loads")
    parser.add_argument("--participants", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    results: dict = {"machine": machine(), "participants": args.participants, "baseline": "AUTH_MODE=open"}
    with tempfile.TemporaryDirectory() as tmp:
        holder: dict = {}

        def app(environ, start_response):
            return holder["app"](environ, start_response)

        with serve(app) as base:
            config = combined_config(base, Path(tmp))
            create_demo(config, args.participants, 5)
            holder["app"] = wsgi = create_wsgi(config)
            combined = Combined(base, config, Stack(base=base, auth=base + "/auth", fhir=base + "/fhir",
                                                    auth_app=wsgi.mounts["/auth"]))
            patient_token = combined.user_token("patient/*.rs", patient=PATIENT)["access_token"]
            from joserfc.jwk import ECKey

            key = ECKey.generate_key("P-384", parameters={"kid": "bench", "alg": "ES384"})
            system_token = combined.backend_token("system/*.rs", key, alg="ES384")["access_token"]
            open_app = create_app({"DATA_DIR": tmp, "AUTH_MODE": "open"})
            with serve(open_app) as open_base:
                cases = {
                    "read Patient": f"Patient/{PATIENT}",
                    "search Observation of one patient (_count=50)": f"Observation?patient=Patient/{PATIENT}&_count=50",
                }
                for label, path in cases.items():
                    http = requests.Session()
                    timed(http, f"{open_base}/fhir/{path}", 20)  # warm-up
                    row = {"open": timed(http, f"{open_base}/fhir/{path}", args.n)}
                    for who, token in (("system token", system_token), ("patient token", patient_token)):
                        headers = {"Authorization": f"Bearer {token}"}
                        timed(http, f"{base}/fhir/{path}", 20, headers=headers)
                        row[who] = timed(http, f"{base}/fhir/{path}", args.n, headers=headers)
                        row[who]["ratio_to_open"] = round(row[who]["median_ms"] / row["open"]["median_ms"], 2)
                    results[label] = row
                    print(f"{label}: open {row['open']['median_ms']:.2f} ms, system token "
                          f"{row['system token']['median_ms']:.2f} ms (x{row['system token']['ratio_to_open']}), "
                          f"patient token {row['patient token']['median_ms']:.2f} ms "
                          f"(x{row['patient token']['ratio_to_open']})")
            open_app.extensions["trialtwin.store"].close()
            agent = UserAgent()
            launched = combined.stack.simulate_launch(agent, "trialtwin-clinician", patient=PATIENT)
            agent.follow(agent.session.get(launched["url"], allow_redirects=False), base + "/app/callback")
            agent.session.get(agent.last_redirect)
            page = timed(agent.session, f"{base}/app/patient/{PATIENT}", args.pages)
            what_if = timed(agent.session, f"{base}/app/patient/{PATIENT}", args.pages,
                            params={"missed": "2,3,4", "adherence": "0.6"})
            from smart_app.clinician import FhirApi, simulate_parameters
            from smart_app.plots import forecast_svg
            from smart_app.clinician import parse_forecast

            api = FhirApi(base + "/fhir", patient_token)
            sim_ms, svg_ms = [], []
            for _ in range(args.pages):
                started = time.perf_counter()
                answer = api.operation(f"Patient/{PATIENT}/$simulate", simulate_parameters(28))
                sim_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                forecast_svg(parse_forecast(answer))
                svg_ms.append((time.perf_counter() - started) * 1000)
            results["$simulate as the page calls it (200 samples, 28 days)"] = {
                "n": args.pages, "median_ms": round(statistics.median(sim_ms), 1)}
            results["forecast SVG render (matplotlib, 3 panels)"] = {
                "n": args.pages, "median_ms": round(statistics.median(svg_ms), 1)}
            print(f"$simulate {statistics.median(sim_ms):.0f} ms, SVG {statistics.median(svg_ms):.0f} ms (medians)")
            results["clinician patient page"] = page
            results["clinician patient page with what-if (2 x $simulate)"] = what_if
            print(f"clinician patient page: median {page['median_ms']:.0f} ms; with what-if {what_if['median_ms']:.0f} ms")
            wsgi.app.extensions["trialtwin.store"].close()
    out = Path(__file__).parent / "results" / "smart_enforcement.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
