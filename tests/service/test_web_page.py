"""The web page at `/` in a real headless browser (Debian's chromium-headless-shell driven by
Playwright), against a real API (uvicorn) and Redis with auth on: it lists a job and follows it
to its end with its curve, shows a refused spec's field error, and cancels a job.

One browser for the module (~1 s of CPU to start); each test gets a fresh context, so its
sessionStorage starts without a key. `AETRAIN_WEB_SCREENSHOT=docs/web-page.png` saves the job
view of the first test (how docs/web-page.png was made).
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from service.app import create_app
from shared.jobs import JobRecord, JobState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import serve
from tests.specs import digits_spec

if TYPE_CHECKING:
    from workers.group_pool import GroupPool

pytestmark = pytest.mark.timeout(120)

# Installed by scripts/install (apt); Playwright's own browser download needs its CDN.
BROWSERS = ("chromium-headless-shell", "chromium")
WAIT_MS = 15_000  # every wait on the page is bounded; a step that takes longer is a failure


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = next(filter(None, map(shutil.which, BROWSERS)), None)
    if executable is None:
        pytest.fail(f"no browser: install Debian's {BROWSERS[0]} (scripts/install does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors include what the Content-Security-Policy refused; a refused call (the
    # 401 that asks for the key, the 422 of a bad spec) is logged too, and is expected.
    page.on("console", lambda m: m.type == "error" and not m.text.startswith(
        "Failed to load resource") and errors.append(m.text))  # fmt: skip
    yield page
    context.close()
    assert not errors, f"the page threw or logged errors: {errors}"


@pytest.fixture
def base_url(auth_settings: Settings, store: JobStore) -> Iterator[str]:
    with serve(create_app(auth_settings)) as url:
        yield url


def open_with_key(page: Page, base_url: str, key: str) -> None:
    """Open the page, which asks for a key on its first 401, and enter it once."""
    page.goto(f"{base_url}/")
    expect(page.locator("#key-form")).to_be_visible(timeout=WAIT_MS)
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form")).to_be_hidden()


def job_row(page: Page, job_id: str) -> Locator:
    return page.locator(f'#jobs tr[data-job-id="{job_id}"]')


def queued_job(store: JobStore, tenant: str, epochs: int = 2) -> JobRecord:
    job, created = store.submit(
        JobRecord.for_spec(parse_job_spec(digits_spec(epochs=epochs)), tenant)
    )
    assert created and job.state is JobState.QUEUED
    return job


@pytest.mark.ray
def test_the_page_follows_a_job_to_its_end_with_its_curve_and_pictures(
    page: Page, base_url: str, store: JobStore, storage: LocalStorage, auth_settings: Settings,
    ray_address: str, group_pool: "GroupPool",
) -> None:  # fmt: skip
    from workers.dispatcher import Dispatcher

    _, key = store.api_keys.create("alice")
    job = queued_job(store, "alice", epochs=2)
    open_with_key(page, base_url, key)
    expect(job_row(page, job.id).locator(".state")).to_have_text("queued", timeout=WAIT_MS)
    job_row(page, job.id).click()
    expect(page.locator("#job-state")).to_have_text("queued")

    # What `aetrain worker` does, once, while the page follows the job's event stream.
    Dispatcher(store, storage, auth_settings.require_redis_url(), ray_address,
               pool=group_pool).run_once(2000)  # fmt: skip
    assert store.get(job.id).state is JobState.SUCCEEDED, store.get(job.id).error

    expect(job_row(page, job.id).locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=WAIT_MS)
    (stage,) = [s.name for s in store.get(job.id).stages]
    curve = page.locator(f'#curves figure[data-stage="{stage}"]')
    expect(curve).to_have_attribute("data-epochs", "2", timeout=WAIT_MS)
    expect(curve.locator("figcaption")).to_contain_text("train_loss")
    # The first series' colour on the canvas: a curve was drawn, not only its frame.
    drawn = curve.locator("canvas").evaluate(
        """canvas => {
            const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
                if (px[i] === 0x1f && px[i + 1] === 0x77 && px[i + 2] === 0xb4) n++;
            }
            return n;
        }"""
    )
    assert drawn > 50, f"{drawn} pixels of the train_loss curve"
    for name in ("curves.png", "reconstructions.png", "latent.png"):
        page.wait_for_function(
            f"document.querySelector('img[data-artifact=\"{name}\"]')?.naturalWidth > 0",
            timeout=WAIT_MS,
        )
    page.fill("#interp-steps", "6")
    strip = page.locator("#interp-strip")
    expect(strip).to_have_attribute("data-request", '{"a":0,"b":1,"steps":6}', timeout=WAIT_MS)
    assert strip.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    expect(page.locator("#interp-steps-out")).to_have_text("6")
    with page.expect_download(timeout=WAIT_MS) as download:
        page.click("#download-encoder")
    assert download.value.suggested_filename == f"{job.id}-encoder.pt"
    assert Path(download.value.path()).read_bytes()[:2] == b"PK"  # TorchScript: a zip

    if shot := os.environ.get("AETRAIN_WEB_SCREENSHOT"):
        page.locator("#interp-strip").scroll_into_view_if_needed()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=shot, full_page=True)


def test_a_refused_spec_shows_its_field_error_next_to_the_field(
    page: Page, base_url: str, store: JobStore
) -> None:
    _, key = store.api_keys.create("alice")
    open_with_key(page, base_url, key)
    spec = (
        "kind: autoencoder\n"
        "name: too-short\n"
        "data: {dataset: digits}\n"
        "model: {arch: dense, hidden: [32], latent_dim: 4}\n"
        "training:\n"
        "  epochs: 0   # below the bound\n"
        "  batch_size: 64\n"
    )
    page.fill("#spec", spec)
    page.click("#submit-form button[type=submit]")
    error = page.locator('#spec-errors li[data-field="training.epochs"]')
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(error).to_contain_text("line 6")
    expect(page.locator("#spec")).to_have_class("invalid")
    assert store.list_jobs("alice", None, None, 10)[0] == []

    page.fill("#spec", "kind: autoencoder\n  name: bad indentation\n")
    page.click("#submit-form button[type=submit]")
    expect(page.locator("#spec-errors li")).to_have_text("(line 2) unexpected indentation")


def test_cancel_on_the_page_cancels_a_queued_job_and_the_key_outlives_a_reload(
    page: Page, base_url: str, store: JobStore
) -> None:
    _, key = store.api_keys.create("alice")
    job = queued_job(store, "alice")
    other = queued_job(store, "bob")  # another tenant's job is not listed
    open_with_key(page, base_url, key)
    page.reload()  # the key stays in sessionStorage: no second prompt
    expect(job_row(page, job.id)).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#key-form")).to_be_hidden()
    expect(job_row(page, other.id)).to_have_count(0)

    job_row(page, job.id).click()
    expect(page.locator("#cancel")).to_be_enabled(timeout=WAIT_MS)
    assert store.get(job.id).state is JobState.QUEUED
    page.click("#cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(job_row(page, job.id).locator(".state")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(page.locator("#cancel")).to_be_disabled()
    assert store.get(job.id).state is JobState.CANCELLED
    assert store.get(other.id).state is JobState.QUEUED


def test_the_list_shows_the_newest_50_and_more_on_request(
    page: Page, base_url: str, store: JobStore
) -> None:
    _, key = store.api_keys.create("alice")
    ids = [queued_job(store, "alice").id for _ in range(55)]  # newest last
    open_with_key(page, base_url, key)
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(50, timeout=WAIT_MS)
    expect(job_row(page, ids[-1])).to_be_visible()  # newest first
    expect(job_row(page, ids[0])).to_have_count(0)
    page.click("#jobs-more")
    expect(rows).to_have_count(55, timeout=WAIT_MS)
    expect(job_row(page, ids[0])).to_be_visible()
    expect(page.locator("#jobs-more")).to_be_hidden()
