"""The web page in a real browser: Debian's chromium, driven by Playwright, against ``cinematic serve``.

Playwright's own browser download is not used (nor reachable in CI); ``executable_path`` points at the system's
chromium. On a developer machine without it the test is skipped with the reason; CI sets
``CINEMATIC_REQUIRE_BROWSER=1`` (``.ci/run`` installs chromium), and there a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.serve_helpers import ServerProcess

STEPS = 40  # about four seconds on one thread: several polls of the progress bar
HAVE_ENOUGH_DATA = 4  # HTMLMediaElement.readyState
VIDEO = "document.querySelector('.job video')"


def _browser() -> str:
    """The chromium to drive, or skip (fail, under CINEMATIC_REQUIRE_BROWSER=1) saying what is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (the test extra)")
    try:
        import fastapi  # noqa: F401
    except ImportError:
        missing.append("the serve extra")
    chromium = shutil.which("chromium")
    if chromium is None:
        missing.append("Debian's chromium on PATH (apt-get install chromium)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CINEMATIC_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; CINEMATIC_REQUIRE_BROWSER=1 makes that an error")
        pytest.skip(reason)
    return chromium


def test_page_generates_and_plays_a_video(tmp_path):
    chromium = _browser()
    from playwright.sync_api import sync_playwright

    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    try:
        with sync_playwright() as playwright:
            # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{server.url}/")
                page.wait_for_selector("select[name=sampler] option", state="attached")  # it has read /healthz
                page.fill("textarea[name=prompt]", "a blue square moving up")
                page.fill("input[name=num_inference_steps]", str(STEPS))
                page.fill("input[name=seed]", "5")
                page.click("#generate")

                shown = _watch_progress(page)
                midway = [value for value in shown if 0 < value < 100]
                assert len(set(midway)) >= 2, f"the progress bar moved through the run: {shown}"
                assert shown == sorted(shown) and shown[-1] == 100, shown

                video = page.locator(".job video").first
                video.wait_for(state="visible")
                page.wait_for_function(f"() => {VIDEO}.readyState >= {HAVE_ENOUGH_DATA}", timeout=30_000)
                # Play from the start (the clip is two seconds and loops), then see time pass.
                page.evaluate(f"() => {{ const v = {VIDEO}; v.currentTime = 0; v.play(); }}")
                page.wait_for_function(f"() => !{VIDEO}.paused && {VIDEO}.currentTime > 0.5", timeout=30_000)
                state = page.evaluate(
                    f"() => {{ const v = {VIDEO};"
                    " return {error: v.error, width: v.videoWidth, height: v.videoHeight, duration: v.duration}; }"
                )
                assert state == {"error": None, "width": 32, "height": 32, "duration": 2}, state

                card = page.locator(".job").first
                assert "seed 5" in card.locator(".settings").inner_text()
                href = card.locator("a.download[data-variant=webm]").get_attribute("href")
                assert href.endswith("/content?variant=webm")
                screenshot = tmp_path / "page.png"
                page.screenshot(path=str(screenshot))
                assert screenshot.stat().st_size > 10_000

                # The settings beyond one prompt: a schedule in place of the prompt, a picture to animate, loop, FreeU.
                page.fill("textarea[name=prompt]", "")
                page.click("#more-settings summary")
                page.fill("input[name=prompt_schedule]", "0: a red circle moving right | 8: a red circle moving left")
                page.set_input_files("input[name=init_image]", str(_picture(tmp_path / "still.png")))
                page.check("input[name=loop]")
                page.check("input[name=freeu]")
                page.fill("input[name=num_inference_steps]", "4")
                page.click("#generate")
                page.wait_for_function("() => document.querySelectorAll('.job').length === 2")
                newest = page.locator(".job").first
                page.wait_for_function("() => document.querySelector('.job').dataset.status === 'completed'",
                                       timeout=60_000)  # fmt: skip
                settings = newest.locator(".settings").inner_text()
                assert "from a picture" in settings and "loop" in settings and "FreeU" in settings, settings
                assert newest.locator(".prompt").inner_text().startswith("0: a red circle moving right")
                assert page.locator("#form-error").inner_text() == ""
                assert errors == [], errors
            finally:
                browser.close()
    finally:
        server.stop()


def _picture(path):
    from PIL import Image

    from cinematic.data.shapes import render_clip

    Image.fromarray(render_clip("a green square moving up", seed=3)[0]).save(path)
    return path


def _watch_progress(page, timeout: float = 120.0) -> list[int]:
    """The progress bar's values, sampled until the job completes."""
    values: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value, status = page.evaluate(
            "() => { const card = document.querySelector('.job');"
            " return card ? [card.querySelector('progress').value, card.dataset.status] : [0, 'none']; }"
        )
        if status != "none" and (not values or values[-1] != value):
            values.append(int(value))
        if status in ("completed", "failed", "cancelled"):
            assert status == "completed", page.locator(".job .status").first.inner_text()
            return values
        time.sleep(0.05)
    raise AssertionError(f"the job did not complete in {timeout} s; progress seen: {values}")
