"""Serving engine benchmarks, in one process, as ratios against an anchor measured alongside.

    python bench/serve.py [--model PATH] [--repeats 3] [--skip-training] [--device cuda --dtype fp16]

1. Throughput: 16 concurrent requests, each with its own adapter (16 different adapters), vs the
   same 16 requests run one by one on the same engine. Demo model (32 x 32, 30 steps), adapters of
   the paper's shape (r = 32, n = 16 on to_q, LoRA on to_v) with random weights.
2. Step cost of mixing: one UNet step for a batch of 16 requests using 16 adapters vs 16 requests
   all using one adapter (same batch size, same shapes).
3. Adapter swap on an SD 1.5-shaped UNet (random weights: speed does not depend on values, 16 x 16
   latents are never run): resident (already in a slot), from the host cache into a slot, cold
   from disk into a slot, vs diffusers ``load_lora_adapter`` (+ ``delete_adapters``) of a LoRA of the
   same rank (r = 32, to_q and to_v).
4. Latency of one request while a training job runs in another process vs idle (the process model
   of ``styleinject serve``: generation and training in separate workers). Measured first, in a
   clean process.
Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
from styleinject.pipeline import generation_defaults, load_pipeline
from styleinject.serving import AdapterRef, Engine, Request

PAPER = StyleInjectConfig(rank=32, num_styles=16, alpha=32, target_modules=["to_q", "to_v"], style_modules=["to_q"])


def random_adapters(unet_factory, folder: Path, count: int, cfg: StyleInjectConfig = PAPER) -> list[str]:
    """``count`` adapters of ``cfg``'s shape with random weights, saved under ``folder``."""
    unet = unet_factory()
    inject(unet, cfg)
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_parameters(unet):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.05)
        paths.append(str(save_adapter(unet, folder / f"a{i:02d}")))
    return paths


def throughput(make_pipe, adapters: list[str], steps: int, repeats: int) -> list[tuple[str, float]]:
    pipe = make_pipe()
    size = generation_defaults(pipe)["width"]
    requests = [Request("two red circles on a white background", seed=i, steps=steps, width=size, height=size,
                        adapters=[AdapterRef(a)]) for i, a in enumerate(adapters)]
    engine = Engine(pipe, max_batch=64, slots=len(adapters) + 1)
    engine.generate(requests[0])  # warm-up: every adapter read and resident, kernels warm
    for r in requests:
        engine.generate(Request(r.prompt, seed=0, steps=1, width=size, height=size, adapters=r.adapters))
    one_by_one = concurrent = float("inf")
    for _ in range(repeats):  # alternated, best of each: a busy machine slows both, not one
        started = time.perf_counter()
        for r in requests:
            engine.generate(r)
        one_by_one = min(one_by_one, time.perf_counter() - started)
        started = time.perf_counter()
        futures = [engine.submit(r) for r in requests]
        for f in futures:
            f.result()
        concurrent = min(concurrent, time.perf_counter() - started)
    engine.stop()
    n = len(requests)
    return [(f"{n} requests one by one (anchor)", n / one_by_one), (f"{n} requests concurrently, batched", n / concurrent)]


def step_cost(make_pipe, adapters: list[str], repeats: int) -> list[tuple[str, float]]:
    size = generation_defaults(make_pipe())["width"]

    def timed_batch(refs: list[str]) -> float:
        engine = Engine(make_pipe(), max_batch=256, slots=len(adapters) + 1, autostart=False)
        for i, a in enumerate(refs):
            engine.submit(Request("a blue star", seed=i, steps=1000, width=size, height=size, adapters=[AdapterRef(a)]))
        engine.step()  # admit all (and warm up)
        times = []
        for _ in range(repeats * 5):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    single = timed_batch([adapters[0]] * len(adapters))
    mixed = timed_batch(adapters)
    single2 = timed_batch([adapters[0]] * len(adapters))  # bracket: machine noise shows as a drift
    anchor = min(single, single2)
    return [(f"batch of {len(adapters)}, one adapter (anchor)", anchor),
            (f"batch of {len(adapters)}, {len(adapters)} different adapters", mixed)]


def swaps(repeats: int, device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from styleinject.serving.slots import SlotTable
    from styleinject.serving.tiers import HostCache

    def sd15():
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=16, cross_attention_dim=768).to(device, dtype)  # SD 1.5 layout

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = random_adapters(sd15, tmp, 3)
        donor = sd15()
        donor.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
        donor.save_lora_adapter(str(tmp / "peft"), weight_name="lora.safetensors")
        del donor
        unet = sd15()

        def diffusers_load():
            unet.load_lora_adapter(str(tmp / "peft"), weight_name="lora.safetensors", adapter_name="x", prefix=None)
            unet.delete_adapters("x")

        def sync():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def timed(fn, n):
            fn()
            sync()
            times = []
            for _ in range(n):
                started = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        anchor = timed(diffusers_load, repeats)
        served = sd15()
        table, host = SlotTable(served, num_slots=3), HostCache()
        refs = [AdapterRef(p) for p in ours]
        for ref in refs:
            key, cfg, tensors = host.get(ref)
            table.acquire(key, cfg, tensors)
            table.release(key)

        def resident():  # a request for an adapter already in a slot: pin and unpin it
            key, cfg, tensors = host.get(refs[0])
            table.acquire(key, cfg, tensors)
            table.release(key)

        def from_host():  # evict and copy back in from host memory
            key, cfg, tensors = host.get(refs[1])
            table.evict(key)
            table.acquire(key, cfg, tensors)
            table.release(key)

        def cold():  # from disk: read + copy into a slot
            host.drop(refs[2].cache_key())
            key, cfg, tensors = host.get(refs[2])
            table.evict(key)
            table.acquire(key, cfg, tensors)
            table.release(key)

        rows = [("diffusers load_lora_adapter + delete, LoRA r=32 (anchor)", anchor),
                ("ours, resident (already in a slot)", timed(resident, repeats * 100)),
                ("ours, from the host cache into a slot", timed(from_host, repeats)),
                ("ours, cold from disk into a slot", timed(cold, repeats))]
        return rows


def latency_under_training(make_pipe, model: str, adapters: list[str], repeats: int) -> list[tuple[str, float]]:
    pipe = make_pipe()
    size = generation_defaults(pipe)["width"]
    engine = Engine(pipe)
    request = Request("one green triangle", seed=0, width=size, height=size, adapters=[AdapterRef(adapters[0])])

    def latency() -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.generate(request)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    latency()
    idle = latency()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "styleinject.eval.toyworld.dataset", "--out", str(data), "-n", "16",
                        "--seed", "0", "--style", "stripes"], check=True, capture_output=True)
        cli = Path(sys.executable).with_name("styleinject")
        log = Path(tmp) / "train.log"
        with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the job
            train = subprocess.Popen([str(cli), "finetune", "--base-model", model, "--data", str(data),
                                      "--output", str(Path(tmp) / "out"), "--steps", "100000", "--batch-size", "4"],
                                     stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + 120
            while "loss=" not in log.read_text():  # the job is in its steps
                if train.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the training job did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
            busy = latency()
            if train.poll() is not None:
                raise RuntimeError("the training job ended while latency was measured")
        finally:
            train.kill()
            train.wait()
    engine.stop()
    return [("idle (anchor)", idle), ("while a training job runs in another process", busy)]


def table(title: str, unit: str, rows: list[tuple[str, float]], higher_is_better: bool = False) -> None:
    anchor = rows[0][1]
    print(f"\n| {title} | {unit} | ratio |\n|---|---:|---:|")
    for label, value in rows:
        shown = f"{value:.2f}" if unit.endswith("/s") else (f"{value * 1e3:.3f} ms" if value < 0.01 else f"{value * 1e3:.1f} ms")
        print(f"| {label} | {shown} | {value / anchor:.4g} |")


def main():
    from styleinject.assets import TOY_BASE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TOY_BASE), help="pipeline for 1, 2 and 4 (default: the demo model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per request in 1 (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--skip-training", action="store_true", help="leave out 4")
    parser.add_argument("--only", nargs="+", choices=["throughput", "step", "latency", "swap"],
                        help="run only these parts (default: all)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {args.device} "
          f"{args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    def fresh_pipe():  # one engine per pipeline: each measurement gets its own
        pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = fresh_pipe()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = random_adapters(lambda: pipe.unet.__class__.from_config(pipe.unet.config).to(args.device, dtype),
                                   Path(tmp), 16)
        steps = args.steps or generation_defaults(pipe)["steps"]
        parts = set(args.only or ["throughput", "step", "latency", "swap"])
        if args.skip_training:
            parts.discard("latency")
        if "latency" in parts:  # first: a clean process (engines of the other parts leave threads behind)
            table("latency of one request", "time", latency_under_training(fresh_pipe, args.model, adapters,
                                                                           args.repeats))
        if "throughput" in parts:
            table(f"throughput, {steps} steps, 16 adapters", "requests/s",
                  throughput(fresh_pipe, adapters, steps, args.repeats))
        if "step" in parts:
            table("one UNet step (engine.step)", "time", step_cost(fresh_pipe, adapters, args.repeats))
    if "swap" in parts:
        table("adapter swap, SD 1.5-shaped UNet", "time", swaps(args.repeats, args.device, dtype))


if __name__ == "__main__":
    main()
