"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL for the code that calls the UNet.

Everything else (the adapters, the training loop, the sampler) is the same for every family: they
see one ``Conditioning`` (the UNet's ``encoder_hidden_states`` plus, for SDXL, ``added_cond_kwargs``:
the pooled text embedding of the second text encoder and the micro-conditioning time ids).

    family = family_of(pipe)
    cond = family.encode_prompts(pipe, ["a cat"], device, size=(1024, 1024))
    eps = pipe.unet(z_t, t, **cond.unet_kwargs()).sample
"""

from __future__ import annotations

from styleinject.families.base import Conditioning, Family
from styleinject.families.sd import SD
from styleinject.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {SD.name: SD, SDXL.name: SDXL}

__all__ = ["FAMILIES", "SD", "SDXL", "Conditioning", "Family", "family_for_class", "family_of",
           "family_of_checkpoint"]


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (or of a bare UNet), from the UNet's config: SDXL's UNet is
    the one that takes the text-time added embedding."""
    unet = getattr(pipe, "unet", pipe)
    return SDXL if unet.config.get("addition_embed_type") == "text_time" else SD


def family_for_class(class_name: str) -> Family:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``)."""
    for family in FAMILIES.values():
        if class_name == family.pipeline_class:
            return family
    supported = ", ".join(f.pipeline_class for f in FAMILIES.values())
    raise ValueError(f"pipeline class {class_name!r} is not supported; StyleInject loads {supported}")


def family_of_checkpoint(keys) -> Family:
    """The family of a single-file checkpoint in the original (LDM / SGM) key layout: SDXL's has a
    second text encoder (``conditioner.embedders.1``); SD 1.x/2.x's has ``model.diffusion_model`` only."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return SD
    if any(k.startswith(("down_blocks.", "unet.")) for k in keys):
        raise ValueError("the file holds diffusers-layout weights, not a single-file checkpoint; pass the "
                         "diffusers pipeline folder it came from")
    raise ValueError("not a Stable Diffusion checkpoint: no model.diffusion_model.* keys")
