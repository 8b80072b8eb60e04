"""LoRA files through the service: `styleinject serve` (embedded, the packaged demo model) imports a
kohya file, serves it like any adapter, exports it bit-identically, and refuses what it must."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
from styleinject.assets import TOY_BASE
from styleinject.interop import export_lora
from styleinject.interop.tensorfile import RawTensor, read_tensors, write_tensors
from tests.service.conftest import TINY_GENERATE, Proc, Service, decode_png, free_port, run_cli, service_env, \
    wait_for_http
from tests.service.test_e2e_embedded import _styleinject


def _adapter(out, cfg: StyleInjectConfig):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(TOY_BASE, subfolder="unet")
    inject(unet, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_adapter(unet, out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-serve")
    home, logs = root / "home", root / "logs"
    logs.mkdir()
    env = service_env(progress_interval_s=0.2, lease_ttl_s=5, max_lora_upload_bytes=1024**2)
    port = free_port()
    serve = Proc("serve", [*_styleinject(), "serve", "--home", str(home), "--port", str(port)], env, logs)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", [serve], timeout=120)
        key = run_cli("apikey", "create", "--tenant", "lora", "--home", str(home), env=env).stdout.strip()
        yield Service(f"http://127.0.0.1:{port}", home / "artifacts", [serve]), key, home
    finally:
        serve.stop(timeout=30)


def _upload(client, path, **params):
    with open(path, "rb") as handle:
        return client.post("/adapters/import", params=params, files={"file": (path.name, handle)})


def test_import_generate_export_and_refusals(served, tmp_path):
    service, key, home = served
    ours = _adapter(tmp_path / "ours", StyleInjectConfig.lora(rank=4, alpha=2, conv_target_modules=["conv1"]))
    kohya = export_lora(ours, tmp_path / "style.safetensors", format="kohya")
    adapters_dir = service.artifact_root / "adapters"
    with service.client(key) as client:
        # refused: nothing stored, the keys that do not fit are listed
        wrong = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
        tensors = dict(read_tensors(kohya)[0])
        tensors[f"{wrong}.lora_down.weight"] = tensors[next(k for k in tensors if k.endswith("lora_down.weight"))]
        write_tensors(tmp_path / "bad.safetensors", tensors)
        response = _upload(client, tmp_path / "bad.safetensors", name="bad", base_model="demo")
        assert response.status_code == 422, response.text
        message = response.json()["message"]
        assert wrong in message and "bad.safetensors" in message and str(home) not in message, message
        assert _upload(client, kohya, name="x", base_model="nope").status_code == 422
        write_tensors(tmp_path / "big.safetensors", {"x": RawTensor("U8", (2 * 1024**2,), bytes(2 * 1024**2))})
        assert _upload(client, tmp_path / "big.safetensors", name="x", base_model="demo").status_code == 413
        (tmp_path / "lora.ckpt").write_bytes(b"not read")
        assert _upload(client, tmp_path / "lora.ckpt", name="x", base_model="demo").status_code == 415
        assert client.get("/adapters").json() == []
        assert not adapters_dir.exists() or not any(adapters_dir.iterdir())

        response = _upload(client, kohya, name="imported", base_model="demo")
        assert response.status_code == 201, response.text
        imported = response.json()
        assert imported["kind"] == "import" and imported["base_model"] == "demo"
        assert imported["config"]["num_styles"] == 1 and imported["metadata"]["lora_format"] == "kohya"

        response = client.post("/generate", json={**TINY_GENERATE, "adapter_id": imported["id"]})
        assert response.status_code == 200, (response.text, service.logs())
        served_image = decode_png(response.json()["images"][0])
        base = decode_png(client.post("/generate", json=TINY_GENERATE).json()["images"][0])

        response = client.get(f"/adapters/{imported['id']}/export", params={"format": "kohya"})
        assert response.status_code == 200, response.text
        (tmp_path / "back.safetensors").write_bytes(response.content)
        assert read_tensors(tmp_path / "back.safetensors")[0] == read_tensors(kohya)[0]
        response = client.get(f"/adapters/{imported['id']}/export")  # diffusers by default
        assert response.status_code == 200 and b"unet.down_blocks" in response.content[:100_000]

    # the same image as the original adapter folder run by the library on the same model and seed
    from styleinject.pipeline import generate, load_pipeline

    pipe = load_pipeline(TOY_BASE, device="cpu")
    params = {k: v for k, v in TINY_GENERATE.items() if k != "prompt"}
    local = np.asarray(generate(pipe, TINY_GENERATE["prompt"], adapter=ours, **params)[0], dtype=np.int16)
    assert np.abs(served_image - base).max() > 20, "the imported adapter did not change the image"
    assert np.abs(served_image - local).max() <= 1


def test_export_of_a_dma_adapter_is_409_and_names_the_adapters_own_format(served, tmp_path):
    from api.auth import get_or_create_tenant
    from api.core.db.models import Adapter
    from api.core.db.session import session_scope

    service, key, home = served
    folder = _adapter(service.artifact_root / "jobs" / "dmaadapter", StyleInjectConfig(rank=4, num_styles=2))
    with session_scope(f"sqlite:///{home / 'styleinject.db'}") as session:
        tenant = get_or_create_tenant(session, "lora")
        session.add(Adapter(id="dmaadapter", tenant_id=tenant.id, name="dma", kind="finetune",
                            base_model=str(TOY_BASE), path=str(folder), config={}))
    with service.client(key) as client:
        response = client.get("/adapters/dmaadapter/export", params={"format": "diffusers"})
        assert response.status_code == 409, response.text
        message = response.json()["message"]
        assert "DMA and STA" in message and "load_adapter" in message and "/download" in message
        assert str(service.artifact_root) not in message
