"""The model runner: prepare a request, run one denoising step for a batch of requests, decode.

Euler Ancestral per request, written out so that each request keeps its own schedule, guidance
scale and generator while sharing the UNet forward with the others. Each request's arithmetic is
the same as diffusers' ``EulerAncestralDiscreteScheduler.step`` and ``StableDiffusionPipeline``
(same operations, dtypes and random draws), so a request run alone equals diffusers' image and a
batched request equals itself alone up to the float summation order of the batched matmuls.
The model family (``styleinject.families``) supplies the text conditioning (SDXL's pooled
embeddings and micro-conditioning ride along per sample in ``added_cond_kwargs``) and the decoding;
one engine serves one pipeline, so a batch never mixes families.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import torch.nn.functional as F
from PIL import Image

from styleinject.families import Conditioning, family_of
from styleinject.serving.request import Active, Request
from styleinject.serving.slots import SlotTable


class Runner:
    def __init__(self, pipe, table: SlotTable, compile_backend: str | None = None) -> None:
        from diffusers import EulerAncestralDiscreteScheduler

        self.pipe = pipe
        self.family = family_of(pipe)
        self.table = table
        # torch.compile the UNet ("inductor" on a GPU; "aot_eager" checks the graph logic on a CPU)
        self.compiled = torch.compile(pipe.unet, backend=compile_backend, dynamic=False) if compile_backend else None
        self.scheduler_config = pipe.scheduler.config
        self._scheduler_cls = EulerAncestralDiscreteScheduler
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype

    @torch.no_grad()
    def prepare(self, request: Request, future: Future, slot_ids: torch.Tensor,
                slot_weights: torch.Tensor, keys: list[str]) -> Active:
        """Encode the prompts, draw the initial latents and the schedule (request already resolved)."""
        pipe = self.pipe
        rows = len(request.prompts) * request.num_images
        cfg = request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        cond = self.family.request_conditioning(pipe, request.prompt, request.negative_prompt, request.num_images,
                                                cfg, self.device, (request.height, request.width))
        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(request.steps, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        shape = (rows, pipe.unet.config.in_channels, request.height // pipe.vae_scale_factor,
                 request.width // pipe.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=cond.hidden.dtype).to(self.device)
        latents = latents * scheduler.init_noise_sigma
        return Active(request=request, future=future, rows=rows, cfg=cfg, guidance_scale=request.guidance_scale,
                      timesteps=scheduler.timesteps, sigmas=scheduler.sigmas, latents=latents, cond=cond,
                      slot_ids=slot_ids, slot_weights=slot_weights, generator=generator,
                      size=(request.height, request.width), keys=keys)

    @torch.no_grad()
    def step(self, batch: list[Active]) -> None:
        """One denoising step for every request in ``batch`` (all of one latent size), one UNet call."""
        # 1. the UNet batch: each request's rows, doubled [uncond; cond] for guidance
        samples, timesteps, conds, ids, weights = [], [], [], [], []
        for active in batch:
            sigma = active.sigmas[active.index]
            x = torch.cat([active.latents] * 2) if active.cfg else active.latents
            samples.append(x / ((sigma**2 + 1) ** 0.5))  # scale_model_input
            timesteps.append(active.timesteps[active.index].expand(x.shape[0]))
            conds.append(active.cond)
            repeat = 2 if active.cfg else 1
            ids.append(active.slot_ids.repeat(repeat, 1))
            weights.append(active.slot_weights.repeat(repeat, 1))
        # 2. one forward for all of them, each sample with its own adapters (slot ids); requests
        #    with fewer adapters than the widest one are padded with slot 0 at weight 0
        width = max(i.shape[1] for i in ids)
        ids = [F.pad(i, (0, width - i.shape[1])) for i in ids]
        weights = [F.pad(w, (0, width - w.shape[1])) for w in weights]
        noise = self._forward(torch.cat(samples), torch.cat(timesteps), Conditioning.cat(conds), torch.cat(ids),
                              torch.cat(weights))
        # 3. per request: guidance, then the Euler Ancestral update with its own generator
        start = 0
        for active in batch:
            out = noise[start:start + active.unet_rows]
            start += active.unet_rows
            if active.cfg:
                uncond, text = out.chunk(2)
                out = uncond + active.guidance_scale * (text - uncond)
            active.latents = self._euler_ancestral(active, out)
            active.index += 1

    def _forward(self, sample, timestep, cond: Conditioning, ids, weights) -> torch.Tensor:
        """The UNet on the batch. Compiled, the batch is padded to the next power of two (rows of
        the zero adapter, discarded), so a compiled UNet sees a few shapes only; adapter swaps and
        mixes change no shape, so they never recompile."""
        rows = sample.shape[0]
        unet = self.pipe.unet
        if self.compiled is not None:
            unet = self.compiled
            pad = (1 << (rows - 1).bit_length()) - rows
            if pad:
                sample = torch.cat([sample, sample[-1:].expand(pad, *sample.shape[1:])])
                timestep = torch.cat([timestep, timestep[-1:].expand(pad)])
                cond = cond.pad(pad)
                ids = torch.cat([ids, ids.new_zeros(pad, ids.shape[1])])
                weights = torch.cat([weights, weights.new_zeros(pad, weights.shape[1])])
        self.table.set_batch(ids, weights)
        try:
            return unet(sample, timestep, **cond.unet_kwargs(), return_dict=False)[0][:rows]
        finally:
            self.table.set_batch(None)

    def _euler_ancestral(self, active: Active, model_output: torch.Tensor) -> torch.Tensor:
        sigma_from = active.sigmas[active.index]
        sigma_to = active.sigmas[active.index + 1]
        sample = active.latents.to(torch.float32)  # upcast, as diffusers does
        # 1. predicted original sample (x_0) from the sigma-scaled predicted noise
        if self.scheduler_config.prediction_type == "epsilon":
            pred_original = sample - sigma_from * model_output
        elif self.scheduler_config.prediction_type == "v_prediction":
            pred_original = model_output * (-sigma_from / (sigma_from**2 + 1) ** 0.5) + (sample / (sigma_from**2 + 1))
        else:
            raise ValueError(f"prediction_type {self.scheduler_config.prediction_type!r} is not supported; "
                             "use an epsilon or v_prediction model")
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        # 2. convert to an ODE derivative and take the deterministic part of the step
        derivative = (sample - pred_original) / sigma_from
        prev = sample + derivative * (sigma_down - sigma_from)
        # 3. the ancestral noise, drawn from this request's generator on the CPU
        noise = torch.randn(model_output.shape, generator=active.generator, dtype=model_output.dtype)
        prev = prev + noise.to(model_output.device) * sigma_up
        return prev.to(model_output.dtype)

    @torch.no_grad()
    def decode(self, active: Active) -> list[Image.Image]:
        image = self.family.decode(self.pipe, active.latents, active.generator)
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])
