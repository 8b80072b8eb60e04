"""The dashboard: server-rendered pages of the calling tenant, with a little vendored JS.

Pages (HTML, not in the OpenAPI schema except the overview):

- ``/dashboard``: jobs (linked to their page, updated in place while one is active) and adapters
  (with their newest eval scores).
- ``/dashboard/jobs/{id}``: parameters, status, queue position, live loss and learning-rate curves
  (history from ``job_events``, then ``GET /jobs/{id}/events``), checkpoints, the event log, errors.
- ``/dashboard/playground``: ``POST /generate`` with several adapters and weights, and a compare view
  (one ``POST /generations`` per adapter, the same prompt and seed, side by side).
- ``/dashboard/datasets``: thumbnails and captions, and an upload form with a progress bar.

The pages call the JSON API from the browser (``/static/dashboard.js``), authenticated by the
``styleinject_key`` cookie (``api.deps.KEY_COOKIE``: HttpOnly, SameSite=Strict).

Auth for browsers: the login form (``api/routes/login.py``: ``POST /dashboard/login``) moves the key
into that cookie; a key never travels in a URL. An old ``/dashboard?key=...`` link is redirected to
the form without using the key. ``?logout=1`` clears the cookie. A bearer header works too.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import authenticate
from api.checkpoints import select_metric
from api.core.db.models import Adapter, Dataset, EvalScore, Job, Tenant
from api.core.jobs import history
from api.core.settings import Settings
from api.core.webhooks import check_events
from api.deps import KEY_COOKIE, SessionDep, SettingsDep
from api.routes.common import adapter_base_model, job_out
from api.routes.webhooks import deliveries
from api.schemas import JobEventOut

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
templates.env.globals["adapter_base_model"] = adapter_base_model  # a registered name, never a server path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATASET_PREVIEW = 60  # items shown per dataset
THUMB_PX = 128
DELIVERIES_SHOWN = 50  # a job page's newest webhook deliveries (progress events can be many)


class _LoginNeeded(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _tenant(request: Request, session: Session, settings: Settings) -> Tenant:
    """The tenant of the bearer header or the dashboard cookie; _LoginNeeded otherwise."""
    header = request.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(KEY_COOKIE)
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    tenant = authenticate(session, key, bootstrap) if key else None
    if tenant is None:
        raise _LoginNeeded("Enter an API key." if not key else "That key is invalid or revoked.")
    return tenant


def _login(request: Request, message: str) -> Response:
    return templates.TemplateResponse(request, "login.html", {"message": message}, status_code=401)


def _script_json(value: Any) -> str:
    """JSON to embed in a <script type="application/json">: no "</script>" can end it early."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(request: Request, template: str, context: dict[str, Any]) -> Response:
    return templates.TemplateResponse(request, template, context)


@router.get("", response_class=HTMLResponse, summary="HTML dashboard (log in at /dashboard/login)",
            responses={303: {"description": "?key= (ignored): redirect to /dashboard/login; ?logout=1"},
                       401: {"content": {"text/html": {}}, "description": "Key form"}})
def read_dashboard(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str | None, Query(description="Deprecated and ignored (keys never go in URLs): "
                                     "redirects to the login form")] = None,
    logout: bool = False,
) -> Response:
    if logout:
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(KEY_COOKIE)
        return response
    if key is not None:  # an old link with the key in the URL: log in by the form (api/routes/login.py)
        return RedirectResponse("/dashboard/login", status_code=303)
    try:
        tenant = _tenant(request, session, settings)
    except _LoginNeeded as exc:
        return _login(request, exc.message)
    jobs = [job_out(j) for j in session.scalars(
        select(Job).where(Job.tenant_id == tenant.id).order_by(Job.created_at.desc()).limit(50))]
    adapters = list(session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant.id).order_by(Adapter.created_at.desc()).limit(50)))
    scores: dict[str, dict[str, float]] = {}  # adapter id -> metric -> newest value
    if adapters:
        for row in session.scalars(select(EvalScore).where(EvalScore.adapter_id.in_([a.id for a in adapters]))
                                   .order_by(EvalScore.created_at)):
            scores.setdefault(row.adapter_id, {})[row.metric] = row.value
    return _page(request, "dashboard.html",
                 {"tenant": tenant, "jobs": jobs, "adapters": adapters, "scores": scores, "nav": "jobs",
                  "active": any(j.status in ("queued", "running") for j in jobs)})


# -- job page ---------------------------------------------------------------------------------------

def job_queue_position(session: Session, job: Job) -> int | None:
    """Jobs of any tenant queued before this one (0 = next); None unless it is queued."""
    if job.status != "queued":
        return None
    return session.scalar(select(func.count()).where(Job.status == "queued", Job.created_at < job.created_at))


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def read_job_page(job_id: str, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    try:
        tenant = _tenant(request, session, settings)
    except _LoginNeeded as exc:
        return _login(request, exc.message)
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        return templates.TemplateResponse(request, "not_found.html", {"tenant": tenant, "what": f"job {job_id}"},
                                          status_code=404)
    out = job_out(job)
    events = [JobEventOut.model_validate(e).model_dump(mode="json") for e in history(session, job.id)]
    sent = [d.model_dump(mode="json") for d in deliveries(session, tenant.id, job_id=job.id, limit=DELIVERIES_SHOWN)] \
        if job.webhook_url else []
    return _page(request, "job.html", {
        "tenant": tenant, "job": out, "nav": "jobs", "deliveries_shown": DELIVERIES_SHOWN,
        "webhook_events": check_events(job.webhook_events) if job.webhook_url else [],
        "queue_position": job_queue_position(session, job), "select_metric": select_metric(job),
        "events": [e for e in events if e["kind"] != "progress"],
        "initial": _script_json({"job": out.model_dump(mode="json"), "events": events, "deliveries": sent}),
    })


# -- playground -------------------------------------------------------------------------------------

@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
def read_playground(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    try:
        tenant = _tenant(request, session, settings)
    except _LoginNeeded as exc:
        return _login(request, exc.message)
    adapters = list(session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant.id).order_by(Adapter.created_at.desc()).limit(100)))
    return _page(request, "playground.html", {
        "tenant": tenant, "adapters": adapters, "nav": "playground",
        "limits": {"max_size": settings.max_image_size, "max_steps": settings.max_inference_steps,
                   "max_images": settings.max_num_images},
    })


# -- datasets ---------------------------------------------------------------------------------------

def _natural(path: Path) -> list[Any]:
    """Sort key: img2 before img10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def dataset_items(dataset: Dataset, limit: int = DATASET_PREVIEW) -> list[dict[str, Any]]:
    """The first ``limit`` items of a stored dataset: ``{"index", "name", "caption", "image"}``.

    Cheap on purpose (no decoding; the upload was validated already): a metadata.jsonl is read as
    written, otherwise images are listed in name order with their same-name .txt captions.
    ``image`` is the file's path, used only by :func:`read_dataset_thumbnail`.
    """
    if not dataset.path:
        return []
    root = Path(dataset.path)
    if root.is_file():  # a prompts-only file (distill)
        items = []
        with open(root, encoding="utf-8", errors="replace") as handle:
            for n, line in enumerate(handle):
                if len(items) >= limit:
                    break
                line = line.strip()
                if line.startswith("{"):
                    try:
                        line = str(json.loads(line).get("text", line))
                    except (ValueError, AttributeError):
                        pass
                if line:
                    items.append({"index": len(items), "name": f"line {n + 1}", "caption": line, "image": None})
        return items
    if not root.is_dir():
        return []
    metadata = sorted(root.rglob("metadata.jsonl"), key=lambda p: len(p.parts))
    items: list[dict[str, Any]] = []
    if metadata:
        base = metadata[0].parent
        with open(metadata[0], encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if len(items) >= limit:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or "file_name" not in record:
                    continue
                image = (base / str(record["file_name"])).resolve()
                items.append({"index": len(items), "name": str(record["file_name"]),
                              "caption": record.get("text"), "image": image})
        return items
    images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
              and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for image in sorted(images, key=_natural):
        if len(items) >= limit:
            break
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else None
        items.append({"index": len(items), "name": str(image.relative_to(root)), "caption": caption, "image": image})
    return items


@router.get("/datasets", response_class=HTMLResponse, include_in_schema=False)
def read_datasets_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    try:
        tenant = _tenant(request, session, settings)
    except _LoginNeeded as exc:
        return _login(request, exc.message)
    datasets = list(session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc()).limit(50)))
    return _page(request, "datasets.html", {
        "tenant": tenant, "nav": "datasets", "preview": DATASET_PREVIEW,
        "datasets": [(d, dataset_items(d)) for d in datasets],
        "max_upload_bytes": settings.max_upload_bytes,
    })


@router.get("/datasets/{dataset_id}/thumbs/{index}", include_in_schema=False)
def read_dataset_thumbnail(dataset_id: str, index: int, request: Request, session: SessionDep,
                           settings: SettingsDep) -> Response:
    """A PNG thumbnail (at most THUMB_PX square) of item ``index`` of :func:`dataset_items`."""
    try:
        tenant = _tenant(request, session, settings)
    except _LoginNeeded:
        raise HTTPException(401, "log in at /dashboard first") from None
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise HTTPException(404, f"dataset {dataset_id} not found")
    items = dataset_items(dataset, index + 1)
    if index < 0 or index >= len(items) or items[index]["image"] is None:
        raise HTTPException(404, f"dataset {dataset_id} has no image {index}")
    image, root = items[index]["image"], Path(dataset.path).resolve()
    if not image.resolve().is_relative_to(root) or not image.is_file():
        raise HTTPException(404, f"dataset {dataset_id} has no image {index}")

    from PIL import Image

    try:
        with Image.open(image) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            data = buffer.getvalue()
    except OSError:
        raise HTTPException(404, f"dataset {dataset_id}: image {index} is unreadable") from None
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
