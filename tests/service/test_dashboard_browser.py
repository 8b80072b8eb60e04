"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python
API through ``executable_path``; no browser download) against ``styleinject serve`` (embedded: SQLite,
one real worker, the packaged toy demo model).

Covers: log in without the key in the URL; a job page whose loss curve, checkpoints and status
update from the SSE stream without a reload, and whose long error wraps; a real training job
watched to the end; the playground (several adapters with weights, and compare side by side);
the datasets page (upload with progress, thumbnails, captions); ``/docs`` with every request off
the machine blocked. Each page is checked at 1400 x 900 and at phone width (no horizontal scroll).

Screenshots go to ``runs/screenshots/dashboard/`` (or ``$STYLEINJECT_SCREENSHOT_DIR``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import REPO, Proc, dataset_zip, free_port, service_env, wait_for_http

CHROMIUM = os.environ.get("STYLEINJECT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable: apt-get install -y chromium "
                       "(or set STYLEINJECT_CHROMIUM); .ci/run installs it"),
]

KEY = "browser-test-bootstrap-key"
SHOTS = Path(os.environ.get("STYLEINJECT_SCREENSHOT_DIR") or REPO / "runs" / "screenshots" / "dashboard")
DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
GRIDS = "[...document.querySelectorAll('#checkpoints img.grid')]"
GRIDS_LOADED = f"{GRIDS}.every(i => i.complete && i.naturalWidth > 0)"
# grids of 8 denoising steps: the grid test needs them, the others pay little for them
TRAIN = {"kind": "finetune", "steps": 30, "resolution": 32, "checkpoint_every": 10, "learning_rate": 1e-3,
         "sample_steps": 8, "adapter": {"rank": 4, "num_styles": 2}}


def _styleinject() -> list[str]:
    script = Path(sys.executable).with_name("styleinject")
    return [str(script)] if script.exists() else [sys.executable, "-m", "styleinject.cli"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    home, logs = root / "home", root / "logs"
    logs.mkdir()
    env = service_env(bootstrap_key=KEY, progress_interval_s=0.2)
    port = free_port()
    serve = Proc("serve", [*_styleinject(), "serve", "--home", str(home), "--port", str(port)], env, logs)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", [serve], timeout=120)
        yield {"base": f"http://127.0.0.1:{port}", "home": home, "root": root, "proc": serve}
    finally:
        serve.stop(timeout=30)


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def api(service):
    with httpx.Client(base_url=service["base"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


class Page:
    """A browser tab at a viewport; page errors (uncaught JS exceptions) fail the test."""

    def __init__(self, browser, base: str, viewport: dict[str, int]) -> None:
        self.base = base
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def login(self) -> None:
        page = self.page
        page.goto(self.base + "/dashboard")
        page.fill("input[name=key]", KEY)
        page.press("input[name=key]", "Enter")
        page.wait_for_selector("header.top")
        assert KEY not in page.url and "key=" not in page.url, page.url

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def no_horizontal_scroll(self) -> None:
        width, inner = self.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= inner, f"page is {width}px wide in a {inner}px viewport"

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def desktop(browser, service):
    tab = Page(browser, service["base"], DESKTOP)
    yield tab
    tab.close()


@pytest.fixture
def phone(browser, service):
    tab = Page(browser, service["base"], PHONE)
    yield tab
    tab.close()


def _settings(service):
    from api.core.settings import Settings

    return Settings(home=service["home"])


def test_login_without_key_in_url_and_docs_offline(desktop, service):
    page = desktop.page
    desktop.goto("/dashboard")
    assert page.locator("input[name=key]").get_attribute("type") == "password"
    desktop.shot("login")
    desktop.login()
    assert page.locator("h1").first.inner_text() == "Jobs"
    desktop.shot("overview")

    # /docs with everything off this machine blocked: Swagger UI comes from the package
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(service["base"]):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    desktop.context.route("**/*", only_local)
    desktop.goto("/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=20000)
    assert "StyleInject" in page.locator(".swagger-ui .info .title").inner_text()
    page.wait_for_selector(".opblock-summary-path", timeout=20000)
    assert outside == []
    desktop.shot("docs-offline")


def test_job_page_updates_live_and_wraps_errors(desktop, phone, service):
    """A job driven from here (no worker): points, a checkpoint and the failure arrive over SSE."""
    from api.auth import get_or_create_tenant
    from api.core.db.models import Checkpoint, EvalScore
    from api.core.db.session import session_scope
    from api.core.jobs import create_job, record_event
    from worker.lease import JobLease

    settings = _settings(service)
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        job_id = create_job(session, tenant_id=tenant.id, kind="finetune",
                            params={"steps": 40, "checkpoint_every": 10, "learning_rate": 1e-4}).id
    lease = JobLease(settings, job_id, "browser-test-worker")
    assert lease.claim().status == "claimed"
    for step in range(1, 6):
        lease.report({"step": step, "total": 40, "loss": 1.0 / step, "lr": 1e-4,
                      "terms": {"loss_out_kd": 0.6 / step, "loss_feat_kd": 0.4 / step}}, force=True)

    desktop.login()
    page = desktop.page
    desktop.goto("/dashboard")
    row = f"tr[data-job='{job_id}']"
    assert "5/40" in page.inner_text(f"{row} .c-progress")
    page.evaluate("window.__notReloaded = true")
    lease.report({"step": 6, "total": 40, "loss": 1.0 / 6, "lr": 1e-4}, force=True)
    page.wait_for_function(f"document.querySelector(\"{row} .c-progress\").textContent.includes('6/40')",
                           timeout=15000)  # the overview polls GET /jobs while a job is active
    assert page.evaluate("window.__notReloaded") is True

    page.click(f"a[href='/dashboard/jobs/{job_id}']")  # the jobs table links to the job page
    page.wait_for_selector("#loss-chart svg path.series")
    assert page.get_attribute("#loss-chart", "data-points") == "6"
    assert page.is_visible("#terms-figure")  # per-term losses (distill) get their own chart
    assert "loss_feat_kd" in page.inner_text("#terms-chart .legend") and "loss_out_kd" in page.inner_text("#terms-chart")
    assert page.inner_text("#status") == "running"
    page.evaluate("window.__notReloaded = true")

    with session_scope(settings.database_url) as session:
        session.add(Checkpoint(job_id=job_id, step=10, path=str(service["root"] / "ckpt-10")))
        record_event(session, job_id, "checkpoint", {"step": 10, "name": "step-000010"})
    for step in range(7, 13):
        lease.report({"step": step, "total": 40, "loss": 0.5 / step, "lr": 1e-4}, force=True)
        time.sleep(0.1)
    # the stream polls the row (0.5 s), so it may skip points written faster: the newest one arrives
    page.wait_for_function("document.querySelector('#progress-text').textContent === '12 / 40'", timeout=15000)
    assert int(page.get_attribute("#loss-chart", "data-points")) > 6
    page.wait_for_selector("#checkpoints figure.ckpt[data-step='10']")
    # the checkpoint's scores (the worker scores its grid) arrive live: card, badge, chart, log
    with session_scope(settings.database_url) as session:
        checkpoint = session.query(Checkpoint).filter_by(job_id=job_id, step=10).one()
        session.add(EvalScore(checkpoint_id=checkpoint.id, job_id=job_id, metric="clipscore", value=187.5))
        record_event(session, job_id, "score", {"metric": "clipscore", "value": 187.5, "step": 10})
    page.wait_for_selector("#checkpoints figure.ckpt.best[data-step='10'] .badge")
    assert "187.5" in page.inner_text("#checkpoints figure.ckpt[data-step='10'] dl.scores")
    assert page.get_attribute(".score-figure[data-metric=clipscore] .chart", "data-points") == "1"
    assert "score clipscore = 187.5 at step 10" in page.inner_text("#log")
    desktop.shot("job-running")

    error = "RuntimeError: " + "x" * 1500 + " and then a very long path /" + "/".join(["segment"] * 120)
    assert lease.finish("failed", error=error)
    page.wait_for_function("document.querySelector('#status').textContent === 'failed'", timeout=15000)
    assert page.evaluate("window.__notReloaded") is True  # live updates, no reload
    assert page.is_visible("#error") and page.inner_text("#error").startswith("RuntimeError")
    assert page.is_hidden("#cancel")
    assert "failed" in page.inner_text("#log")
    desktop.no_horizontal_scroll()
    desktop.shot("job-failed")

    phone.login()
    phone.goto(f"/dashboard/jobs/{job_id}")
    phone.page.wait_for_selector("#loss-chart svg")
    phone.no_horizontal_scroll()
    phone.shot("phone-job-failed")
    phone.goto("/dashboard")
    phone.no_horizontal_scroll()
    phone.shot("phone-overview")


def test_job_page_shows_webhook_deliveries_and_their_retries_live(desktop, phone, service):
    """Deliveries written here (as the sender would): the table shows them and follows a retry that
    succeeds and the final event's failure without a reload."""
    from api.auth import get_or_create_tenant
    from api.core.db.models import WebhookDelivery
    from api.core.db.session import session_scope
    from api.core.jobs import create_job
    from worker.lease import JobLease

    settings = _settings(service)
    url = "https://hooks.example.com/styleinject/" + "long-path-" * 12
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        job_id = create_job(session, tenant_id=tenant.id, kind="finetune", params={"steps": 40},
                            webhook_url=url, webhook_events=["start", "checkpoint", "completed"]).id
    lease = JobLease(settings, job_id, "browser-test-worker")
    assert lease.claim().status == "claimed"

    def deliver(event, **values):
        with session_scope(settings.database_url) as session:
            row = WebhookDelivery(job_id=job_id, event=event, url=url, payload={}, **values)
            session.add(row)
            session.flush()
            return row.id

    deliver("start", status="delivered", attempts=1, response_code=204)
    retried = deliver("checkpoint", status="pending", attempts=2, response_code=503,
                      error="HTTP 503 from the receiver; next attempt in 4 s")

    desktop.login()
    page = desktop.page
    desktop.goto(f"/dashboard/jobs/{job_id}")
    page.wait_for_selector("#deliveries tr[data-status=pending]")
    assert "start, checkpoint, completed to" in page.inner_text("h2:has(+ .table-wrap #deliveries)")
    assert page.inner_text(f"#deliveries tr[data-delivery='{retried}'] td:nth-child(4)").startswith("HTTP 503")
    page.evaluate("window.__notReloaded = true")

    with session_scope(settings.database_url) as session:  # the retry gets through
        row = session.get(WebhookDelivery, retried)
        row.status, row.attempts, row.response_code, row.error = "delivered", 3, 200, None
    page.wait_for_selector(f"#deliveries tr[data-delivery='{retried}'][data-status=delivered]", timeout=15000)
    assert lease.finish("failed", error="RuntimeError: out of memory")
    deliver("completed", status="failed", attempts=5, error="connection refused after 5 attempts")
    page.wait_for_selector("#deliveries tr[data-status=failed]", timeout=15000)  # the status change refreshes
    assert page.evaluate("window.__notReloaded") is True
    assert page.locator("#deliveries tbody tr").count() == 3
    desktop.no_horizontal_scroll()
    desktop.shot("job-webhooks")

    phone.login()
    phone.goto(f"/dashboard/jobs/{job_id}")
    phone.page.wait_for_selector("#deliveries tr[data-status=failed]")
    phone.no_horizontal_scroll()
    phone.shot("phone-job-webhooks")


def test_datasets_page_upload_with_progress_and_thumbnails(desktop, phone, service, tmp_path):
    desktop.login()
    page = desktop.page
    desktop.goto("/dashboard/datasets")
    page.set_input_files("input[name=file]", str(dataset_zip(tmp_path / "shapes.zip", n=6)))
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#upload-text:has-text('ready')", timeout=30000)
    assert page.evaluate("document.querySelector('#upload-bar').style.width") == "100%"
    page.wait_for_selector("section.dataset figure.thumb img", timeout=15000)  # after the reload
    page.wait_for_function("[...document.querySelectorAll('figure.thumb img')].every(i => i.complete)")
    section = page.locator("section.dataset", has_text="shapes.zip").first
    assert section.locator("figure.thumb").count() == 6
    assert "a red square, style 0" in section.inner_text()
    widths = section.locator("figure.thumb img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths
    desktop.shot("datasets")

    # a bad upload shows the API's message
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    page.set_input_files("input[name=file]", str(bad))
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#upload-error:not([hidden])", timeout=15000)
    assert page.inner_text("#upload-error").strip()
    desktop.shot("datasets-upload-error")

    phone.login()
    phone.goto("/dashboard/datasets")
    phone.no_horizontal_scroll()
    phone.shot("phone-datasets")


def test_real_job_then_playground_compare(desktop, phone, service, api, tmp_path):
    with open(dataset_zip(tmp_path / "train.zip", n=4), "rb") as handle:
        response = api.post("/datasets", files={"file": ("train.zip", handle, "application/zip")})
    assert response.status_code == 201, response.text
    dataset_id, adapters = response.json()["id"], []
    for seed, name in enumerate(("first", "second")):
        response = api.post("/train", json={**TRAIN, "dataset_id": dataset_id, "name": name, "seed": seed})
        assert response.status_code == 202, response.text
        adapters.append(response.json())

    # watch the first job from the page until it ends (SSE, no reload)
    desktop.login()
    page = desktop.page
    desktop.goto(f"/dashboard/jobs/{adapters[0]['id']}")
    page.wait_for_function("document.querySelector('#status').textContent === 'succeeded'", timeout=180000)
    assert int(page.get_attribute("#loss-chart", "data-points")) >= 2
    assert page.locator("#checkpoints figure.ckpt").count() >= 1
    assert page.inner_text("#progress-text") == "30 / 30"
    desktop.shot("job-succeeded")
    deadline = time.monotonic() + 180
    while api.get(f"/jobs/{adapters[1]['id']}").json()["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "second training job did not finish"
        time.sleep(0.5)
    assert api.get(f"/jobs/{adapters[1]['id']}").json()["status"] == "succeeded"

    desktop.goto("/dashboard/playground")
    rows = page.locator(".adapter-row")
    assert rows.count() == 2
    first, second = page.locator(".adapter-row[data-name=first]"), page.locator(".adapter-row[data-name=second]")
    first.locator("input[type=checkbox]").check()
    second.locator("input[type=checkbox]").check()
    second.locator("input[type=number]").fill("0.5")
    page.fill("textarea[name=prompt]", "a red square")
    page.fill("input[name=seed]", "7")
    page.fill("input[name=steps]", "4")
    page.click("#generate")  # one POST /generate with both adapters and their weights
    page.wait_for_selector("#results img", timeout=120000)
    caption = page.inner_text("#results figcaption")
    assert "first × 1" in caption and "second × 0.5" in caption and "seed 7" in caption
    desktop.shot("playground-generate")

    page.click("#compare")  # the base model and each adapter, same prompt and seed, side by side
    page.wait_for_function("document.querySelectorAll('#results figure.result img').length === 3", timeout=120000)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    captions = page.locator("#results figcaption").all_inner_texts()
    assert len(captions) == 3 and "base model" in captions[0] and all("seed 7" in c for c in captions)
    assert page.locator("#results .error").count() == 0
    desktop.shot("playground-compare")

    phone.login()
    phone.goto("/dashboard/playground")
    phone.page.locator(".adapter-row input[type=checkbox]").first.check()
    phone.page.fill("input[name=steps]", "4")
    phone.page.click("#compare")
    phone.page.wait_for_function("document.querySelectorAll('#results img').length === 2", timeout=120000)
    phone.no_horizontal_scroll()
    phone.shot("phone-playground-compare")


def test_sample_grids_scores_and_promote(desktop, phone, service, api, tmp_path):
    """A real job (the service renders a grid into every checkpoint and scores it with the toy CLIP
    and the attribute checker): watch it, see the grids, the scores and the best, promote one."""
    with open(dataset_zip(tmp_path / "grid.zip", n=4), "rb") as handle:
        response = api.post("/datasets", files={"file": ("grid.zip", handle, "application/zip")})
    assert response.status_code == 201, response.text
    response = api.post("/train", json={**TRAIN, "dataset_id": response.json()["id"], "name": "gridded",
                                        "select_metric": "toystyle", "validation_seeds": [0, 1, 2]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    desktop.login()
    page = desktop.page
    desktop.goto(f"/dashboard/jobs/{job_id}")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_function("document.querySelector('#status').textContent === 'succeeded'", timeout=240000)
    assert page.evaluate("window.__notReloaded") is True  # grids and scores arrived over SSE
    job = api.get(f"/jobs/{job_id}").json()
    steps = [c["step"] for c in job["checkpoints"]]
    assert steps == [10, 20, 30]
    cards = page.locator("#checkpoints figure.ckpt")
    assert cards.count() == 3
    page.wait_for_function(f"{GRIDS}.length === 3 && {GRIDS_LOADED}")
    sizes = page.locator("#checkpoints img.grid").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, "
                                                               "i.naturalHeight])")
    assert all(size == [3 * 32 + 2 * 2, 4 * 32 + 3 * 2] for size in sizes), sizes  # 3 seeds x 4 prompts, 2 px apart
    best = [c["step"] for c in job["checkpoints"] if c["best"]]
    assert len(best) == 1 and page.locator("#checkpoints figure.ckpt.best").count() == 1
    best_card = page.locator(f"#checkpoints figure.ckpt.best[data-step='{best[0]}']")
    assert best_card.locator(".badge").is_visible()
    for card in cards.all():
        text = card.locator("dl.scores").inner_text()
        assert "clipscore" in text and "toystyle" in text, text
    for metric in ("toystyle", "clipscore"):
        assert page.get_attribute(f".score-figure[data-metric={metric}] .chart", "data-points") == "3"
    desktop.no_horizontal_scroll()
    desktop.shot("job-checkpoints")

    best_card.locator("button.promote-button").click()
    best_card.locator(".promote a").wait_for(timeout=30000)
    adapter_id = best_card.locator(".promote a").get_attribute("href").rsplit("=", 1)[1]
    adapter = api.get(f"/adapters/{adapter_id}").json()
    assert (adapter["source_job_id"], adapter["source_step"]) == (job_id, best[0])
    assert adapter["name"] == f"gridded-step{best[0]}"
    best_card.scroll_into_view_if_needed()
    desktop.shot("job-promoted")

    phone.login()
    phone.goto(f"/dashboard/jobs/{job_id}")
    phone.page.wait_for_function(GRIDS_LOADED)
    promoted = phone.page.locator(f"#checkpoints figure.ckpt[data-step='{best[0]}'] .promote a")
    assert promoted.count() == 1 and promoted.inner_text() == adapter["name"]  # after a reload too
    other = phone.page.locator("#checkpoints figure.ckpt:not(.best)").first
    other.locator("button.promote-button").click()
    other.locator(".promote a").wait_for(timeout=30000)
    phone.no_horizontal_scroll()
    phone.shot("phone-job-checkpoints")
    for promoted in api.get("/adapters").json():  # leave the adapters list as the other tests expect it
        if promoted["source_job_id"] == job_id:
            assert api.delete(f"/adapters/{promoted['id']}").status_code == 204
