"""Emu's image decoder: the UNet and the VAE decoder (ONNX, onnxruntime) driven by the numpy
PNDM sampler, with classifier-free guidance. No torch.

    dec = ImageDecoder(bundle, providers, threads)
    latents = dec.sample(cond [32, D], uncond [32, D] | None, steps=50, guidance=7.5, latents=noise)
    pixels = dec.decode(latents)            # [H, W, 3] uint8

As Emu1/models/pipeline.py: guidance applies when guidance > 1 (cond and uncond in one UNet
batch, `uncond + g * (cond - uncond)`); latents are the initial noise N(0, 1) (PNDM's
init_noise_sigma is 1) and go through the scheduler unscaled; the picture is
vae.decode(latents / scaling_factor), mapped from [-1, 1] to [0, 255] and rounded.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .bundle import Bundle
from .encode import _session_options
from .errors import BundleError
from .pndm import PNDM, PNDMConfig

ProgressFn = Callable[[int, int], None]          # (steps done, steps total)


def _load(bundle: Bundle, name: str, providers: list, threads: int):
    import onnxruntime as ort
    try:
        return ort.InferenceSession(str(bundle.file(name)), _session_options(threads), providers=providers)
    except Exception as e:
        raise BundleError(f"{name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None


class ImageDecoder:
    def __init__(self, bundle: Bundle, providers: list, threads: int = 0):
        gen = bundle.manifest["generation"]
        self.unet = _load(bundle, gen["unet"]["file"], providers, threads)
        self.vae = _load(bundle, gen["vae_decoder"]["file"], providers, threads)
        self.scheduler = PNDMConfig.from_dict(gen["scheduler"])
        self.channels = int(gen["latent_channels"])
        self.vae_scale = int(gen["vae_scale_factor"])             # pixels per latent cell
        self.scaling = float(gen["scaling_factor"])
        self.timings: dict = {}

    def latent_shape(self, height: int, width: int) -> tuple:
        return (1, self.channels, height // self.vae_scale, width // self.vae_scale)

    def predict(self, latents: np.ndarray, t: int, cond: np.ndarray, uncond: np.ndarray | None,
                guidance: float) -> np.ndarray:
        """The UNet's noise estimate, guided: one batch of [cond, uncond] when guiding."""
        if uncond is None:
            x, ctx = latents, cond[None]
        else:
            x = np.concatenate([latents, latents])                        # [1, C, h, w] -> [2, C, h, w]
            ctx = np.stack([cond, uncond])                                # [2, 32, D]
        out = self.unet.run(None, {"sample": x, "timestep": np.asarray(t, np.float32),
                                   "encoder_hidden_states": ctx})[0]
        if uncond is None:
            return out
        return out[1:] + np.float32(guidance) * (out[:1] - out[1:])

    def sample(self, cond: np.ndarray, uncond: np.ndarray | None, steps: int, guidance: float,
               latents: np.ndarray, progress: ProgressFn | None = None, cancel=None) -> np.ndarray:
        sched = PNDM(self.scheduler)
        timesteps = sched.set_timesteps(steps)
        x = np.ascontiguousarray(latents, np.float32)
        cond = np.ascontiguousarray(cond, np.float32)
        uncond = None if uncond is None else np.ascontiguousarray(uncond, np.float32)
        t0 = time.perf_counter()
        if progress is not None:
            progress(0, len(timesteps))
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel():
                raise KeyboardInterrupt("image generation cancelled")
            eps = self.predict(x, int(t), cond, uncond, guidance)
            x = sched.step(eps, int(t), x)
            if progress is not None:
                progress(i + 1, len(timesteps))
        self.timings = {"unet_calls": len(timesteps), "denoise_ms": (time.perf_counter() - t0) * 1e3}
        return x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [1, C, h, w] -> RGB [H, W, 3] uint8."""
        t0 = time.perf_counter()
        z = np.ascontiguousarray(latents / np.float32(self.scaling), np.float32)
        img = self.vae.run(None, {"latent_sample": z})[0][0]                  # [1, 3, H, W] -> [3, H, W]
        img = np.clip(img / 2 + 0.5, 0, 1).transpose(1, 2, 0)                 # [3, H, W] -> [H, W, 3]
        self.timings["vae_ms"] = (time.perf_counter() - t0) * 1e3
        return (img * 255).round().astype(np.uint8)
