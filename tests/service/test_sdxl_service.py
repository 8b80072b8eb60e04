"""SDXL through the service: a tiny SDXL registered as a model (and a single-file SDXL checkpoint
registered as a teacher), fine-tuned and distilled by the worker, generated with over HTTP; each
image equals the library's own generation with the downloaded adapter."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np

from tests.service.conftest import (
    TINY_GENERATE,
    TINY_TRAIN,
    Proc,
    Service,
    dataset_zip,
    decode_png,
    free_port,
    run_cli,
    service_env,
    upload_dataset,
    wait_for_http,
    wait_job,
)
from tests.service.test_e2e_embedded import _styleinject


def test_sdxl_finetune_distill_generate_through_the_service(tmp_path, tiny_sdxl_path):
    from styleinject.pipeline import generate, load_pipeline
    from styleinject.testing import tiny_pipeline, write_single_file

    # a community-style teacher: one .safetensors file in SGM layout + its configs beside it
    teacher_dir = tiny_pipeline(tmp_path / "teacher-src", seed=1, kind="sdxl")
    teacher = write_single_file(teacher_dir, tmp_path / "models" / "xl-teacher.safetensors")
    shutil.copytree(teacher_dir, teacher.with_suffix(".config"), ignore=shutil.ignore_patterns("*.safetensors"))

    home, logs = tmp_path / "home", tmp_path / "logs"
    logs.mkdir()
    env = service_env(progress_interval_s=0.2)
    env["HF_HUB_OFFLINE"] = "1"  # workers never download: a lookup would fail slowly, with retries
    port = free_port()
    serve = Proc("serve", [*_styleinject(), "serve", "--home", str(home), "--port", str(port)], env, logs)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", [serve], timeout=120)
        service = Service(f"http://127.0.0.1:{port}", home / "artifacts", [serve])
        run_cli("model", "add", "xl", str(tiny_sdxl_path), "--home", str(home), env=env)
        run_cli("model", "add", "xl-teacher", str(teacher), "--home", str(home), env=env)
        key = run_cli("apikey", "create", "--tenant", "dana", "--home", str(home), env=env).stdout.strip()
        with service.client(key) as client:
            dataset = upload_dataset(client, dataset_zip(tmp_path / "d.zip")).json()
            train = {**TINY_TRAIN, "steps": 2, "checkpoint_every": 2, "dataset_id": dataset["id"], "base_model": "xl"}
            jobs = [client.post("/train", json={**train, "kind": "finetune"}),
                    client.post("/train", json={**train, "kind": "distill", "teacher_model": "xl-teacher"})]
            assert all(r.status_code == 202 for r in jobs), [r.text for r in jobs]
            done = [wait_job(client, r.json()["id"]) for r in jobs]
            assert [j["status"] for j in done] == ["succeeded", "succeeded"], (done, service.logs())

            pipe = load_pipeline(tiny_sdxl_path, device="cpu")
            images = []
            for job in done:
                adapter = client.get(f"/adapters/{job['adapter_id']}").json()
                assert adapter["base_model"] == "xl"
                response = client.post("/generate", json={**TINY_GENERATE, "adapter_id": adapter["id"]})
                assert response.status_code == 200, response.text
                served = decode_png(response.json()["images"][0])
                folder = tmp_path / "dl" / adapter["id"]
                zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter['id']}/download").content)).extractall(folder)
                options = {k: v for k, v in TINY_GENERATE.items() if k != "prompt"}
                local = np.asarray(generate(pipe, TINY_GENERATE["prompt"], adapter=folder, **options)[0])
                assert served.shape == (64, 64, 3) and np.array_equal(served, local)
                images.append(served)
            assert (images[0] != images[1]).any()
    finally:
        serve.stop(timeout=30)
