"""Time ``ppap ui`` as a user sees it: a real browser (Debian's chromium via Playwright) clicks
Generate on the default comparison (unguided, naive, ppap, x0; 16 images; 25 DDIM steps; the
zoo) and this script times the first x0 preview and the finished comparison from the click.
Models are loaded before the page opens (as ``ppap ui`` does). Optionally saves a screenshot of
the page mid-sampling.

    python examples/ui_latency.py --repeats 2 --screenshot docs/ui.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import time


def one_run(page, url: str, screenshot: str | None) -> dict:
    page.goto(url)
    page.wait_for_selector("#generate")
    click = time.perf_counter()
    page.click("#generate")
    page.wait_for_selector("#grid-unguided img", timeout=120_000)
    first = time.perf_counter() - click
    if screenshot:
        page.wait_for_selector("#status :text('sampling ppap (x0')", timeout=120_000)
        page.wait_for_timeout(1200)  # a few previews into the ppap column
        page.screenshot(path=screenshot, full_page=True)
    page.wait_for_selector("#status :text('done in')", timeout=300_000)
    done = time.perf_counter() - click
    rows = page.locator("#results").inner_text().splitlines()
    return {"first_preview_s": round(first, 2), "comparison_s": round(done, 2), "table": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--screenshot", help="PNG path for a screenshot mid-sampling (first run)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from ppap.ui import launch

    app, url = launch("127.0.0.1", 0, block=False)
    runs = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            for k in range(args.repeats):
                runs.append(one_run(page, url, args.screenshot if k == 0 else None))
                print(json.dumps(runs[-1]), flush=True)
            browser.close()
    finally:
        app.close()


if __name__ == "__main__":
    main()
