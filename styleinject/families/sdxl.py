"""SDXL: two CLIP text encoders (their penultimate hidden states concatenated feed cross-attention)
and an added embedding of the second encoder's pooled output plus six micro-conditioning numbers,
``time_ids = (original_h, original_w, crop_top, crop_left, target_h, target_w)``.

Training uses the time ids that generation uses by default, ``(h, w, 0, 0, h, w)`` for an h x w
image: the adapter learns under the conditioning it will be sampled with. (diffusers' SDXL training
script passes each image's pre-resize size and crop instead; our data pipeline resizes and crops
before the loss sees the image, and a resized image is what the model is shown.)
"""

from __future__ import annotations

import torch

from styleinject.families.base import Conditioning, Family


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # the invisible watermark changes pixels after decoding; diffusers adds it whenever the optional
    # package is installed, which would make the same request differ between installs
    pipeline_kwargs = {"add_watermarker": False}

    def time_ids(self, pipe, size, dtype) -> torch.Tensor:
        """(1, 6) micro-conditioning for an image of ``size``; diffusers' own helper checks that the
        UNet's added embedding is as wide as these plus the pooled text embedding."""
        return pipe._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)

    def encode_prompts(self, pipe, prompts, device, size) -> Conditioning:
        with torch.no_grad():
            hidden, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        time_ids = self.time_ids(pipe, size, hidden.dtype).to(device).repeat(len(prompts), 1)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    def request_conditioning(self, pipe, prompt, negative_prompt, num_images, guidance, device, size):
        # as StableDiffusionXLPipeline.__call__ (steps 3 and 7) with its default size arguments
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt)
        time_ids = self.time_ids(pipe, size, cond.dtype)
        if guidance:
            cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        rows = cond.shape[0] // (2 if guidance else 1)
        time_ids = time_ids.to(device).repeat(rows, 1)
        return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids})

    def decode(self, pipe, latents, generator=None):
        vae = pipe.vae
        # SDXL's VAE overflows in fp16: diffusers decodes in fp32 when the config says so
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)


SDXL = StableDiffusionXL()
