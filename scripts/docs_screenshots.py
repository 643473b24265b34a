"""Regenerate the app screenshots in docs/img from a real Chromium run against a running demo server.

Usage: ``trialtwin demo`` in one terminal (smart mode, launch simulator on), then
``.venv/bin/python scripts/docs_screenshots.py http://127.0.0.1:8080 tt201-p062 tt-201``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def save(page, name: str) -> None:
    """A full-page screenshot in 256 colours: a third of the size of the browser's PNG, same look for UI text."""
    path = OUT / name
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def sign_in(page) -> None:
    """Answer the authorization server's sign-in page, when it shows one."""
    if page.locator("#password").count():
        page.fill("#username", "dr.chen")
        page.fill("#password", "trialtwin")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state("load")


def launch(page, base: str, **context) -> None:
    """The launch simulator as an EHR would: signed-in practitioner, app, context, then approve."""
    page.goto(f"{base}/auth/launch-simulator")
    sign_in(page)  # the simulator shows nothing before its practitioner signs in
    page.select_option("#client_id", "trialtwin-clinician")
    for field, value in context.items():
        page.fill(f"#{field}", value)
    page.get_by_role("button", name="Launch").click()
    page.wait_for_load_state("load")
    sign_in(page)
    page.get_by_role("button", name="Approve").click()
    page.wait_for_load_state("load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("patient", help="an on-study participant of the demo")
    parser.add_argument("study", help="the demo study id")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        for width, name in ((1280, "clinician-view.png"), (400, "clinician-view-400px.png")):
            context = browser.new_context(viewport={"width": width, "height": 900})
            page = context.new_page()
            launch(page, args.base, patient=args.patient)
            page.get_by_role("button", name="Assess risk now ($predict-dropout)").click()
            page.wait_for_load_state("load")
            page.fill("#missed", "2, 3, 4")
            page.fill("#adherence", "0.6")
            page.get_by_role("button", name="Simulate").click()
            page.wait_for_load_state("load")
            save(page, name)
            context.close()
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        launch(page, args.base, study=args.study)
        save(page, "study-view.png")
        context.close()
        browser.close()
    print(f"wrote {OUT}/clinician-view.png, clinician-view-400px.png, study-view.png")


if __name__ == "__main__":
    main()
