"""The Influence Explorer in a real browser: Debian's headless Chromium, driven by Playwright, clicks
Generate and sees the galleries the engine computes; bad input shows a message on the page and the
app goes on serving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright
from space_app import TOP_K, build_artifacts, served_explorer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CAPTION = re.compile(r"^#\d+ · \d · [+-]\d")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served_explorer(build_artifacts(tmp_path_factory.mktemp("space"))) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium).")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(app, browser):
    url, _ = app
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside = []
    page.on("request", lambda request: None if request.url.startswith(url) else outside.append(request.url))
    page.goto(url, wait_until="networkidle")
    yield page
    page.close()
    assert not [address for address in outside if not address.startswith("data:")], f"requests outside: {outside}"


def captions(page: Page, gallery: str) -> list[str]:
    return page.locator(f"#{gallery} .caption-label").all_inner_texts()


def generate(page: Page, seed: int) -> None:
    page.locator("#seed input").fill(str(seed))
    page.click("#generate")


def expected_captions(explorer, seed: int, steps: int) -> dict[str, list[str]]:
    explanation = explorer.explain(explorer.generate(seed, steps))
    return {which: [caption for _, caption in getattr(explanation, which)] for which in ("proponents", "opponents")}


def test_generate_shows_the_galleries(app, page, tmp_path):
    _, explorer = app
    generate(page, 3)
    for gallery in ("proponents", "opponents"):
        expect(page.locator(f"#{gallery} .caption-label")).to_have_count(TOP_K, timeout=60_000)
    expected = expected_captions(explorer, 3, explorer.config.num_inference_steps)
    for gallery in ("proponents", "opponents"):
        shown = captions(page, gallery)
        assert shown == expected[gallery]
        assert all(CAPTION.match(caption) for caption in shown)
        widths = page.locator(f"#{gallery} img").evaluate_all("images => images.map(image => image.naturalWidth)")
        assert len(widths) == TOP_K and all(width >= 8 for width in widths)  # every thumbnail decoded
    expect(page.locator("#summary")).to_contain_text("48 training examples scored")
    screenshot = tmp_path / "space.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as image:
        assert image.width == 1280 and image.height >= 1000


def test_bad_input_shows_a_message_and_the_app_keeps_serving(app, page, tmp_path):
    _, explorer = app
    generate(page, -5)
    expect(page.get_by_text("Seed must be a whole number between 0 and 4294967295, got -5")).to_be_visible(
        timeout=30_000
    )
    assert "Traceback" not in page.content()

    page.get_by_role("tab", name="Attribute your image").click()
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    page.locator("#upload input[type=file]").set_input_files(str(fake))
    expect(page.locator("#upload")).to_contain_text("fake.png", timeout=30_000)
    page.click("#attribute")
    expect(page.get_by_text("fake.png is not a readable image")).to_be_visible(timeout=30_000)
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 3000)).save(huge)
    page.locator("#upload button[aria-label='Clear']").click()
    page.locator("#upload input[type=file]").set_input_files(str(huge))
    expect(page.locator("#upload")).to_contain_text("huge.png", timeout=30_000)
    page.click("#attribute")
    expect(page.get_by_text("The image is 5000×3000 pixels; the largest side accepted is 1024")).to_be_visible(
        timeout=30_000
    )

    page.get_by_role("tab", name="Generate").click()
    generate(page, 4)
    expected = expected_captions(explorer, 4, explorer.config.num_inference_steps)
    expect(page.locator("#proponents .caption-label")).to_have_text(expected["proponents"], timeout=60_000)
    assert "Traceback" not in page.content()
