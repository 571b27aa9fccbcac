"""The README's app screenshots, from real runs a user would make: ``python docs/app_screenshots.py``.

Starts the app on the shipped models, drives it in headless Chromium (as ``tests/test_browser.py`` does)
and writes ``docs/app-restore.png``, ``docs/app-edit.png`` and ``docs/app-personalize.png``:

* Restore: the held-out "tiger face" at 64x64, box inpainting, P2L on ``emoji-sd`` at 100 steps (its
  sensible minimum) with the caption as its prompt;
* Invert & edit: the held-out "orange heart", Newton-Raphson inversion at 10 steps, edited to "blue heart"
  with the app's defaults (attention control auto, i.e. a word swap, and the configured edit guidance);
* Personalize: the six held-out "man with white cane" emoji, token ``<cane-man>`` from "man", 300 steps
  (the app's default, as in ``docs/personalize-eval``), then 4 samples of "<cane-man>".

Outputs of the runs go to a temporary folder (``STUDIO_APP_OUTPUTS``) that is deleted afterwards; the
page shows file names only. Takes about 10-20 minutes on 2 CPU cores. ``--only restore,edit`` re-makes
some of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHOTS = ("restore", "edit", "personalize")
VIEWPORT = {"width": 1400, "height": 1500}


def _wait_for(page, text: str, minutes: float) -> None:
    try:
        page.get_by_text(text).first.wait_for(timeout=int(minutes * 60_000))
    except Exception:
        errors = page.locator(".toast-body").all_inner_texts()
        raise SystemExit(f"'{text}' never showed; page errors: {errors}") from None


def _panel(page):
    return page.locator("[role=tabpanel]:visible")


def _choose(page, label: str, option: str) -> None:
    _panel(page).get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_timeout(1500)


def _number(page, label: str, value) -> None:
    box = _panel(page).get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")
    page.wait_for_timeout(800)


def _example(examples, caption: str) -> tuple[str, str]:
    return next((p, c) for p, c in examples if c == caption)


def restore(page, examples) -> None:
    path, caption = _example(examples, "tiger face")
    _choose(page, "model (registered name, or a folder inside the allowed model folders)",
            "emoji-sd · text-to-image (latent solvers)")
    _choose(page, "solver", "P2L (prompt-tuning latent DPS)")
    prompt = "prompt (a description of the image, for the text-prompted solvers)"
    _panel(page).get_by_label(prompt).fill(caption)
    _panel(page).locator("input[type=file]").first.set_input_files(path)
    page.wait_for_timeout(3000)
    _number(page, "steps", 100)
    page.get_by_role("button", name="Restore").click()
    _wait_for(page, "PSNR", minutes=30)
    page.wait_for_timeout(1500)


def edit(page, examples) -> None:
    page.get_by_role("tab", name="Invert & edit").click()
    page.wait_for_timeout(1000)
    path, caption = _example(examples, "orange heart")
    _panel(page).locator("input[type=file]").first.set_input_files(path)
    page.wait_for_timeout(1500)
    page.get_by_label("source prompt (describes the image)").fill(caption)
    page.get_by_label("target prompt (the edit)").fill(caption.replace("orange", "blue"))
    _number(page, "steps", 10)
    page.get_by_role("button", name="Invert & edit").click()
    _wait_for(page, "reconstruction PSNR", minutes=10)
    page.wait_for_timeout(1500)


def personalize(page, examples) -> None:
    page.get_by_role("tab", name="Personalize").click()
    page.wait_for_timeout(1000)
    files = [path for path, caption in examples if caption.startswith("man with white cane")]
    _panel(page).locator("input[type=file]").first.set_input_files(files)
    page.wait_for_timeout(2000)
    token = page.get_by_label("new token")
    token.fill("<cane-man>")
    token.press("Tab")
    init = page.get_by_label("initializer word (one token)")
    init.fill("man")
    init.press("Tab")
    page.get_by_role("button", name="Train").click()
    _wait_for(page, "learned <cane-man>", minutes=60)
    page.get_by_role("button", name="Generate").click()
    images = _panel(page).locator("#samples img")
    deadline = time.monotonic() + 600
    while images.count() < 4 and time.monotonic() < deadline:
        page.wait_for_timeout(1000)
    page.wait_for_timeout(1500)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SHOTS), help=f"comma list of {', '.join(SHOTS)}")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as outputs:
        os.environ["STUDIO_APP_OUTPUTS"] = outputs
        from playwright.sync_api import sync_playwright

        from studio import app
        from studio.workflows.web import examples

        demo = app.build()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        shots = {"restore": restore, "edit": edit, "personalize": personalize}
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                            args=["--no-sandbox"])
                for name in wanted:
                    page = browser.new_page(viewport=VIEWPORT)
                    page.goto(demo.local_url)
                    page.wait_for_timeout(2000)
                    start = time.perf_counter()
                    shots[name](page, examples(64))
                    out = ROOT / "docs" / f"app-{name}.png"
                    page.screenshot(path=str(out), full_page=True)
                    print(f"{out.relative_to(ROOT)} ({time.perf_counter() - start:.0f} s)", flush=True)
                    page.close()
                browser.close()
        finally:
            demo.close()


if __name__ == "__main__":
    main()
