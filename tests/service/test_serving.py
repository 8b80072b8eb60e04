"""Serving under load, over HTTP: `styleinject serve` (embedded: a train worker and a generate worker
whose engine batches requests across tenants and adapters), the packaged demo model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import torch

from styleinject.assets import TOY_BASE
from tests.service.conftest import Proc, Service, dataset_zip, decode_png, free_port, run_cli, service_env, \
    upload_dataset, wait_for_http
from tests.service.test_e2e_embedded import _styleinject

ADAPTER_IDS = ("stripes0", "dots0000", "weak0000")


def _register_adapters(home, tenant_name: str) -> None:
    """Three adapters for the demo model with strong random weights, stored and registered the way
    a finished training job leaves them (artifact folder + adapters row)."""
    from diffusers import UNet2DConditionModel

    from api.auth import get_or_create_tenant
    from api.core.db.models import Adapter
    from api.core.db.session import session_scope
    from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter

    configs = [StyleInjectConfig(rank=8, num_styles=4), StyleInjectConfig.lora(rank=4),
               StyleInjectConfig(rank=4, num_styles=2)]
    with session_scope(f"sqlite:///{home / 'styleinject.db'}") as session:
        tenant = get_or_create_tenant(session, tenant_name)
        for seed, (adapter_id, cfg) in enumerate(zip(ADAPTER_IDS, configs, strict=True)):
            unet = UNet2DConditionModel.from_pretrained(TOY_BASE, subfolder="unet")
            inject(unet, cfg)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in adapter_parameters(unet):
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if seed < 2 else 0.05))
            folder = save_adapter(unet, home / "artifacts" / "jobs" / adapter_id)
            session.add(Adapter(id=adapter_id, tenant_id=tenant.id, name=adapter_id, kind="finetune",
                                base_model=str(TOY_BASE), path=str(folder), config=cfg.to_dict()))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    home, logs = root / "home", root / "logs"
    logs.mkdir()
    env = service_env(progress_interval_s=0.2, lease_ttl_s=5, generate_timeout_s=240)
    port = free_port()
    serve = Proc("serve", [*_styleinject(), "serve", "--home", str(home), "--port", str(port)], env, logs)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", [serve], timeout=120)
        key = run_cli("apikey", "create", "--tenant", "erin", "--home", str(home), env=env).stdout.strip()
        other = run_cli("apikey", "create", "--tenant", "frank", "--home", str(home), env=env).stdout.strip()
        _register_adapters(home, "erin")
        yield Service(f"http://127.0.0.1:{port}", home / "artifacts", [serve]), key, other
    finally:
        serve.stop(timeout=30)


def test_accepted_then_followed_then_fetched_and_several_adapters(served):
    service, key, other = served
    body = {"prompt": "two red circles on a white background", "seed": 5, "steps": 6,
            "adapters": [{"id": "stripes0", "scale": 1.0}, {"id": "dots0000", "scale": 0.5}]}
    with service.client(key) as client:
        response = client.post("/generations", json=body)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status"] in ("queued", "running") and accepted["adapters"][1] == {"id": "dots0000",
                                                                                           "scale": 0.5}
        events, event = [], None
        with client.stream("GET", f"/generations/{accepted['id']}/events", timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line.split(":", 1)[1])))
                    if event == "end":
                        break
        assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded", (events, service.logs())
        final = client.get(f"/generations/{accepted['id']}").json()
        assert final["queue_position"] is None and final["params"]["width"] == 32 and len(final["images"]) == 1
        png = client.get(final["images"][0])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        # the synchronous route gives the same image for the same request
        sync = client.post("/generate", json=body)
        assert sync.status_code == 200, sync.text
        combined = decode_png(sync.json()["images"][0])
        from PIL import Image
        import io

        fetched = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"), dtype=np.int16)
        assert np.abs(fetched - combined).max() <= 2
        one = decode_png(client.post("/generate", json={**body, "adapters": body["adapters"][:1]}).json()["images"][0])
        assert np.abs(one - combined).max() > 10  # the second adapter contributes
        # another tenant cannot use these adapters, nor see the request
        with service.client(other) as stranger:
            assert stranger.post("/generate", json=body).status_code == 404
            assert stranger.get(f"/generations/{accepted['id']}").status_code == 404


def test_200_concurrent_generate_requests_zero_5xx_and_healthz_stays_fast(served):
    """200 requests at once, over three adapters and the base model, two tenants: every answer is a
    200 (none 5xx), same-seed requests with the same adapter get the same image, and /healthz
    answers within 1 s throughout."""
    service, key, other = served
    choices = [None, "stripes0", "dots0000", "weak0000"]

    async def run() -> tuple[list[httpx.Response], list[float]]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=300, limits=limits) as client:
            done = asyncio.Event()
            latencies: list[float] = []

            async def health() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    response = await client.get("/healthz", timeout=5)
                    latencies.append(time.monotonic() - started)
                    assert response.status_code == 200
                    await asyncio.sleep(0.2)

            async def one(i: int) -> httpx.Response:
                adapter = choices[i % 4] if i % 5 else None
                tenant_key = key if adapter or i % 2 else other
                body = {"prompt": "one green triangle", "seed": i % 7, "steps": 8}
                if adapter:
                    body["adapter_id"] = adapter
                return await client.post("/generate", json=body, headers={"Authorization": f"Bearer {tenant_key}"})

            watcher = asyncio.create_task(health())
            responses = await asyncio.gather(*(one(i) for i in range(200)))
            done.set()
            await watcher
            return responses, latencies

    responses, latencies = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert all(code < 500 for code in codes), (sorted(set(codes)), [r.text for r in responses if r.status_code >= 500][:3])
    assert codes.count(200) == 200, [r.text for r in responses if r.status_code != 200][:3]
    assert latencies and max(latencies) < 1.0, max(latencies)
    images: dict[tuple, np.ndarray] = {}
    for i, response in enumerate(responses):
        body = response.json()
        image = decode_png(body["images"][0])
        same = (body["adapter_id"], body["seed"])
        if same in images:  # batched with different neighbours each time: float order only
            assert np.abs(images[same] - image).max() <= 2
        images[same] = image
    assert np.abs(images[("stripes0", 1)] - images[(None, 1)]).max() > 10


def test_generate_is_answered_while_a_long_training_job_runs(served, tmp_path):
    service, key, _ = served
    with service.client(key) as client:
        dataset = upload_dataset(client, dataset_zip(tmp_path / "d.zip")).json()
        job = client.post("/train", json={"kind": "finetune", "dataset_id": dataset["id"], "steps": 100_000,
                                          "resolution": 32, "adapter": {"rank": 4, "num_styles": 2}}).json()
        deadline = time.monotonic() + 120
        while (client.get(f"/jobs/{job['id']}").json()["progress"] or {}).get("step", 0) < 3:
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
        started = time.monotonic()
        response = client.post("/generate", json={"prompt": "a blue square", "seed": 1, "adapter_id": "stripes0"})
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 60
        running = client.get(f"/jobs/{job['id']}").json()
        assert running["status"] == "running", running
        assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
