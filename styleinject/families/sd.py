"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, conditioning by cross-attention only."""

from __future__ import annotations

import torch

from styleinject.families.base import Conditioning, Family


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompts(self, pipe, prompts, device, size) -> Conditioning:
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return Conditioning(text_encoder(ids)[0])

    def request_conditioning(self, pipe, prompt, negative_prompt, num_images, guidance, device, size):
        cond, uncond = pipe.encode_prompt(prompt, device, num_images, guidance, negative_prompt)
        return Conditioning(torch.cat([uncond, cond]) if guidance else cond)

    def decode(self, pipe, latents, generator=None):
        vae = pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]


SD = StableDiffusion()
