"""Screenshots of the built documentation site and of an evaluation's ``report.html``, for docs/images/site/.

    python -m mkdocs build --strict -d site && python scripts/docs_screenshots.py site [--report DIR/report.html]

Headless Debian chromium through playwright's sync API (no browser download; ``--chromium PATH`` for another one),
pages opened as files: the landing page, one API reference page and one rendered notebook."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# screenshot file: (page, a CSS selector scrolled to the top of the view first, or None)
PAGES = {"landing.png": ("index.html", None), "api.png": ("api/vlm.html", None),
         "notebook.png": ("notebooks/inspect.html", "article img")}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site", type=Path, help="the built site folder (mkdocs build -d SITE)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "site")
    ap.add_argument("--report", type=Path, default=None, help="a report.html to screenshot too (report.png)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    shots = {name: (a.site / page, anchor) for name, (page, anchor) in PAGES.items()}
    if a.report:
        shots["report.png"] = (a.report, None)
    missing = [str(p) for p, _ in shots.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"docs_screenshots: no such page(s): {', '.join(missing)} (build the site first)")
    a.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        for name, (path, anchor) in shots.items():
            page.goto(path.resolve().as_uri(), wait_until="load")
            if anchor:  # the first output of a notebook, say, near the top of the view
                page.locator(anchor).first.evaluate("e => window.scrollTo(0, e.getBoundingClientRect().top"
                                                    " + window.scrollY - 300)")
            page.wait_for_timeout(300)
            page.screenshot(path=str(a.out / name))
            print(f"wrote {a.out / name}")
        browser.close()


if __name__ == "__main__":
    main()
