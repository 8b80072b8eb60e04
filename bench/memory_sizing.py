"""GPU memory sizing for docs/ops.md: bytes per resident adapter and per UNet batch row, for an SD 1.5
model at 512 x 512 in float16, computed without a GPU or weights.

- Per resident adapter: the engine's slot table holds each resident adapter's tensors (A, B, router,
  G, padded to the largest rank / style count on each layer; styleinject/serving/slots.py), so a
  slot costs the adapter's parameter count x 2 bytes (float16). Counts from the SD 1.5 UNet config
  (bench/param_counts.py, meta device).
- Per batch row: the UNet forward (and the VAE decode, once per image) run on the meta device under
  a dispatch mode that adds up the bytes of every tensor an operator creates and subtracts them
  when the tensor is freed; the peak of live bytes, at batch 4 minus batch 1, over 3, is the memory
  one more row needs. Weights are created before counting (not included). Attention goes through
  PyTorch's fused scaled-dot-product kernel, as on a GPU (no L x L matrix); views are not counted
  again (a view that outlives its base is counted as freed with the base, so the peak is a slight
  underestimate, well inside the headroom the docs advise). The meta device has no fused attention
  kernel (it would decompose attention into the L x L matrix), so attention is counted as what a
  fused kernel (flash / memory-efficient, PyTorch's choice on CUDA) allocates: its output.

    python bench/memory_sizing.py
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.param_counts import ROWS, SD15_UNET, count, sd15_unet

MiB = 1024**2


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def _fused_attention(query, key, value, *args, **kwargs):
    """What a fused attention kernel allocates: the output (batch, heads, L, value dim)."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def peak_bytes(fn) -> int:
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        with torch.no_grad(), LiveBytes() as mode:
            fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return mode.peak


def unet_peak(unet, batch: int, latent: int = 64) -> int:
    sample = torch.zeros(batch, 4, latent, latent, device="meta", dtype=torch.float16)
    context = torch.zeros(batch, 77, SD15_UNET["cross_attention_dim"], device="meta", dtype=torch.float16)
    t = torch.zeros(batch, device="meta", dtype=torch.float16)
    return peak_bytes(lambda: unet(sample, t, encoder_hidden_states=context))


def vae_peak(vae, batch: int, latent: int = 64) -> int:
    z = torch.zeros(batch, 4, latent, latent, device="meta", dtype=torch.float16)
    return peak_bytes(lambda: vae.decode(z))


def main() -> None:
    from diffusers import AutoencoderKL

    unet = sd15_unet().to(torch.float16)
    print("| adapter (SD 1.5) | parameters | slot memory (float16) |")
    print("|---|---:|---:|")
    for label, cfg in ROWS:
        n = count(unet, cfg)
        print(f"| {label} | {n / 1e6:.2f} M | {2 * n / MiB:.1f} MiB |")
    base = sum(p.numel() for p in unet.parameters())
    print(f"\nSD 1.5 UNet weights: {base / 1e6:.0f} M parameters = {2 * base / MiB:.0f} MiB in float16")
    one, four = unet_peak(unet, 1), unet_peak(unet, 4)
    print(f"UNet forward at 512 x 512: peak activations {one / MiB:.0f} MiB at batch 1, {four / MiB:.0f} MiB at "
          f"batch 4: {(four - one) / 3 / MiB:.0f} MiB per additional row")
    with torch.device("meta"):  # the SD 1.5 VAE (AutoencoderKL's defaults are the SD config but these)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2).to(torch.float16)
    vae_weights = sum(p.numel() for p in vae.parameters())
    one, four = vae_peak(vae, 1), vae_peak(vae, 4)
    print(f"VAE ({vae_weights / 1e6:.0f} M parameters) decode to 512 x 512: peak {one / MiB:.0f} MiB at batch 1, "
          f"{four / MiB:.0f} MiB at batch 4: {(four - one) / 3 / MiB:.0f} MiB per additional image")


if __name__ == "__main__":
    main()
