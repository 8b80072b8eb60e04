"""The engine: batched requests give the images they give alone, adapters never leak across samples."""

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
from styleinject.adapters import AdapterLoadError
from styleinject.pipeline import load_pipeline
from styleinject.serving import AdapterRef, Engine, Request

# Batched and alone differ only in the float summation order of the batched matmuls: at most 2
# levels of 255 in any pixel (seen: 0-1). Different adapters differ by far more (asserted below).
TOLERANCE = 2


def _px(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture
def pipe(tiny_pipeline_path):
    return load_pipeline(tiny_pipeline_path, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_pipeline_path):
    """An engine on a pipeline of its own that runs each request alone (one at a time)."""
    return Engine(load_pipeline(tiny_pipeline_path, device="cpu"), autostart=False)


@pytest.fixture(scope="module")
def adapters(tiny_pipeline_path, tmp_path_factory):
    """Four saved adapters of different shapes and strongly different random weights."""
    from diffusers import UNet2DConditionModel

    configs = [StyleInjectConfig(rank=4, num_styles=2), StyleInjectConfig.lora(rank=2),
               StyleInjectConfig(rank=2, num_styles=3, conv_target_modules=["conv1"]),
               StyleInjectConfig(rank=4, num_styles=4, sta=False)]
    folders = []
    root = tmp_path_factory.mktemp("adapters")
    for i, cfg in enumerate(configs):
        unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
        inject(unet, cfg)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in adapter_parameters(unet):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        folders.append(str(save_adapter(unet, root / f"a{i}")))
    return folders


def _alone(engine: Engine, request: Request):
    future = engine.submit(request)
    while engine.step():
        pass
    return _px(future.result())


def _requests(adapters):
    a = [AdapterRef(f) for f in adapters]
    return [
        Request("a red circle", seed=1, steps=3, width=64, height=64, adapters=[a[0]]),
        Request("a blue square", seed=2, steps=5, width=64, height=64, adapters=[a[1]], num_images=2),
        Request("a red circle", seed=1, steps=3, width=64, height=64),  # base model, same seed as #0
        Request("two stars", seed=3, steps=4, width=64, height=64, guidance_scale=1.0, adapters=[a[2]]),
        Request("a tree", seed=4, steps=2, width=64, height=64, negative_prompt="blurry",
                adapters=[AdapterRef(adapters[3], scale=0.6)]),
        Request("a red circle", seed=1, steps=3, width=48, height=48, adapters=[a[0]]),  # another size
        Request("a blue square", seed=6, steps=3, width=64, height=64,  # two adapters beside one-adapter rows
                adapters=[a[1], AdapterRef(adapters[2], scale=0.5)]),
        Request(["a cat", "a dog"], seed=7, steps=2, width=64, height=64, num_images=2,  # one adapter per prompt
                adapters=[[a[3]], []]),
    ]


def test_batched_requests_equal_themselves_alone_and_never_leak(pipe, adapters, reference):
    requests = _requests(adapters)
    alone = [_alone(reference, r) for r in requests]
    engine = Engine(pipe, autostart=False)
    futures = [engine.submit(r) for r in requests[:4]]
    engine.step()  # four requests admitted into one batch ...
    futures += [engine.submit(r) for r in requests[4:]]  # ... two more join at the next step
    while engine.step():
        pass
    stats = engine.stats()
    assert stats["finished"] == len(requests) and stats["failed"] == 0
    assert stats["mean_batch_rows"] > 4  # batches really held several requests
    for want, future in zip(alone, futures):
        got = _px(future.result())
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE
    # the adapters are strong: every pair of requests with the same prompt and seed differs a lot
    assert np.abs(alone[0] - alone[2]).max() > 20  # adapter vs base model
    assert stats["device_resident"] == 4


def test_several_adapters_in_one_request(pipe, adapters, reference):
    one, two = AdapterRef(adapters[0]), AdapterRef(adapters[1])
    kw = dict(seed=5, steps=3, width=64, height=64)
    only_one = _alone(reference, Request("a cat", adapters=[one], **kw))
    with_zero = _alone(reference, Request("a cat", adapters=[one, AdapterRef(adapters[1], scale=0.0)], **kw))
    both = _alone(reference, Request("a cat", adapters=[one, two], **kw))
    only_two = _alone(reference, Request("a cat", adapters=[two], **kw))
    assert np.abs(with_zero - only_one).max() <= TOLERANCE
    assert np.abs(both - only_one).max() > 10 and np.abs(both - only_two).max() > 10


def test_requests_wait_for_a_free_slot_and_bad_adapters_fail_alone(pipe, adapters, tmp_path):
    engine = Engine(pipe, slots=2, autostart=False)  # one adapter slot besides the base model
    kw = dict(seed=0, steps=2, width=64, height=64)
    requests = [Request("x", adapters=[AdapterRef(f)], **kw) for f in adapters[:2]]
    futures = [engine.submit(r) for r in requests]
    base = engine.submit(Request("x", **kw))
    engine.step()
    # the second adapter waits for the slot; the base-model request behind it goes ahead
    assert engine.stats()["active"] == 2 and engine.position(requests[1].id) == 0
    while engine.step():
        pass
    assert all(f.done() and f.exception() is None for f in [*futures, base])
    assert engine.stats()["device_evictions"] == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterLoadError):
        engine.submit(Request("x", adapters=[AdapterRef(str(bad))], **kw))
    with pytest.raises(ValueError, match="multiple of 8"):
        engine.submit(Request("x", seed=0, steps=2, width=60, height=64))


def test_background_loop_serves_concurrent_callers(pipe, adapters, reference):
    import threading

    engine = Engine(pipe, max_batch=8)
    requests = [Request("a house", seed=i, steps=3, width=64, height=64,
                        adapters=[AdapterRef(adapters[i % 4])]) for i in range(8)]
    results = [None] * len(requests)

    def call(i):
        results[i] = _px(engine.generate(requests[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop()
    for i, request in enumerate(requests):
        assert np.abs(results[i] - _alone(reference, request)).max() <= TOLERANCE


def test_compiled_engine_compiles_once_per_batch_bucket_and_never_for_adapters(pipe, adapters, reference):
    """torch.compile (aot_eager on a CPU): batches are padded to powers of two, so 2 to 6 UNet rows
    make at most 3 graphs, and swapping or mixing adapters adds none."""
    from torch._dynamo.utils import counters

    from styleinject import StyleInjectConfig

    kw = dict(steps=2, width=64, height=64)
    rounds = [[adapters[0]], [adapters[1], None], [adapters[2], adapters[0], None], [None], [adapters[3]]]
    rounds = [[Request("a cat", seed=i, adapters=[] if a is None else [AdapterRef(a)], **kw)
               for i, a in enumerate(round_)] for round_ in rounds]
    want = [[_alone(reference, r) for r in round_] for round_ in rounds]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(pipe, slots=3, compile_backend="aot_eager", autostart=False)
    for folder in adapters:  # size the slot table first (the one allowed shape change)
        engine.table.prepare(StyleInjectConfig.load(folder))
    for round_, expected in zip(rounds, want):
        futures = [engine.submit(r) for r in round_]
        while engine.step():
            pass
        for future, image in zip(futures, expected):
            assert np.abs(_px(future.result()) - image).max() <= TOLERANCE
    assert engine.stats()["device_evictions"] >= 1  # adapters really were swapped
    buckets = {1 << (2 * len(r) - 1).bit_length() for r in rounds}  # guidance doubles the rows
    assert counters["stats"]["unique_graphs"] == len(buckets), dict(counters["stats"])
