"""Emu's image decoder to ONNX: the diffusers UNet (cross-attention width = the LLM's) and the
VAE decoder, plus the scheduler config the runtime's numpy PNDM reads.

optimum's ONNX configs for diffusers (`UNetOnnxConfig`, `VaeDecoderOnnxConfig`) declare the
graphs (inputs, dynamic axes, output names) and optimum's exporter writes them: the files are
the ones optimum's ORT diffusion pipelines use (sample, timestep (a scalar),
encoder_hidden_states -> out_sample; latent_sample -> sample). Validation is scops' own, right
after export, at shapes other than the traced ones (batch 2, another latent size), to 1e-4.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .onnx_stages import DEFAULT_ATOL, EXTERNAL_DATA_BYTES

UNET_FILE, VAE_FILE = "unet.onnx", "vae_decoder.onnx"
N_EMBEDS = 32                        # Emu.n_causal: regressed rows per picture
# Emu1/models/pipeline.py defaults: 512 x 512, 50 steps, guidance 7.5
DEFAULTS = {"steps": 50, "guidance": 7.5, "height": 512, "width": 512}


def load_scheduler_config(pretrain: Path) -> dict:
    path = pretrain / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("_class_name", "PNDMScheduler") != "PNDMScheduler":
        raise ValueError(f"{path}: {cfg['_class_name']}; scops samples with PNDM (Emu's pipeline.py)")
    from scops.runtime.pndm import PNDMConfig
    PNDMConfig.from_dict(cfg)                  # fails here, not at run time, on what PNDM cannot do
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _optimum_export(module, config, out_dir: Path, file: str, opset: int) -> Path:
    """optimum's exporter into a scratch dir, re-saved as `file` (+ `file`.data when large)."""
    import onnx
    from optimum.exporters.onnx import export

    path = out_dir / file
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-export-") as scratch:
        raw = Path(scratch) / file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(model=module, config=config, output=raw, opset=opset)
        model = onnx.load(str(raw))
        weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
        if weight_bytes > EXTERNAL_DATA_BYTES:
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=file + ".data", size_threshold=1024)
        else:
            onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def _max_diff(ref: np.ndarray, got: np.ndarray, what: str) -> float:
    if ref.shape != got.shape:
        raise RuntimeError(f"{what}: onnxruntime shape {got.shape} != PyTorch {ref.shape}")
    d = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
    if not np.isfinite(d):
        raise RuntimeError(f"{what}: non-finite output")
    return d


def validate_unet(unet, path: Path, latent: tuple, n_embd: int, atol: float) -> dict:
    """onnxruntime vs PyTorch at batch 2, a latent size other than the traced one, two timesteps."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for t in (981.0, 21.0):
        x = rng.standard_normal((2, unet.config.in_channels, *latent), dtype=np.float32)
        ctx = rng.standard_normal((2, N_EMBEDS, n_embd), dtype=np.float32)
        with torch.no_grad():
            ref = unet(torch.from_numpy(x), torch.tensor(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
        got = sess.run(None, {"sample": x, "timestep": np.asarray(t, np.float32), "encoder_hidden_states": ctx})[0]
        worst = max(worst, _max_diff(ref.numpy(), got, UNET_FILE))
    if worst > atol:
        raise RuntimeError(f"{UNET_FILE}: ONNX vs PyTorch max abs diff {worst:.3g} > {atol:g}")
    return {"max_abs_diff": worst, "batch": 2, "latent": list(latent), "atol": atol}


def validate_vae(vae, path: Path, latent: tuple, atol: float) -> dict:
    import onnxruntime as ort
    import torch

    z = np.random.default_rng(2).standard_normal((2, vae.config.latent_channels, *latent), dtype=np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z)).sample.numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"latent_sample": z})[0]
    worst = _max_diff(ref, got, VAE_FILE)
    if worst > atol:
        raise RuntimeError(f"{VAE_FILE}: ONNX vs PyTorch max abs diff {worst:.3g} > {atol:g}")
    return {"max_abs_diff": worst, "batch": 2, "latent": list(latent), "atol": atol}


def image_decoder_step(pretrain: Path, n_embd: int, added: dict, opset: int = 17):
    """An assemble_bundle extra step: UNet + VAE decoder -> ONNX, validated; the manifest's
    "generation" record (files, scheduler, latent geometry, defaults)."""
    def run(b, log) -> dict:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from optimum.exporters.onnx.model_configs import UNetOnnxConfig, VaeDecoderOnnxConfig

        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()          # .bin-vs-safetensors and accelerate notes
        scheduler = load_scheduler_config(pretrain)
        unet = UNet2DConditionModel.from_pretrained(pretrain / "unet", **_load_kw(pretrain / "unet")).eval()
        vae = AutoencoderKL.from_pretrained(pretrain / "vae", **_load_kw(pretrain / "vae")).eval()
        if unet.config.cross_attention_dim != n_embd:
            raise ValueError(f"UNet cross-attention width {unet.config.cross_attention_dim} != LLM width {n_embd}")
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        unet_down = 2 ** (len(unet.config.down_block_types) - 1)
        size = int(unet.config.sample_size)
        check = (max(size - unet_down, unet_down), size + unet_down)     # another latent h, w

        t0 = time.perf_counter()
        ucfg = UNetOnnxConfig(unet.config, task="semantic-segmentation")
        _optimum_export(unet, ucfg, b.dir, UNET_FILE, opset)
        unet_val = validate_unet(unet, b.dir / UNET_FILE, check, n_embd, DEFAULT_ATOL)
        log(f"  {UNET_FILE}: exported in {time.perf_counter() - t0:.1f}s; onnxruntime vs PyTorch at batch 2, "
            f"latent {check}: max abs diff {unet_val['max_abs_diff']:.2e} (<= {DEFAULT_ATOL:g})")
        b.add_file(UNET_FILE, "onnx", **_describe(ucfg, opset))
        del unet

        t0 = time.perf_counter()
        vae.forward = lambda latent_sample: vae.decode(z=latent_sample)           # the decoder half only
        vcfg = VaeDecoderOnnxConfig(vae.config, task="semantic-segmentation")
        _optimum_export(vae, vcfg, b.dir, VAE_FILE, opset)
        vae_val = validate_vae(vae, b.dir / VAE_FILE, check, DEFAULT_ATOL)
        log(f"  {VAE_FILE}: exported in {time.perf_counter() - t0:.1f}s; onnxruntime vs PyTorch at batch 2, "
            f"latent {check}: max abs diff {vae_val['max_abs_diff']:.2e} (<= {DEFAULT_ATOL:g})")
        b.add_file(VAE_FILE, "onnx", **_describe(vcfg, opset))
        for name in ("scheduler", "unet", "vae"):                  # the configs, for reference
            shutil.copy(pretrain / name / ("scheduler_config.json" if name == "scheduler" else "config.json"),
                        b.dir / f"{name}_config.json")
            b.add_file(f"{name}_config.json", "data")
        return {"generation": {
            "regress_head": {"op": "projector", "file": "regress_head.safetensors", "in_dim": n_embd,
                             "out_dim": n_embd, "bias": False},
            "n_embeds": N_EMBEDS, "boi": "[IMG]", "special": {t: added[t] for t in ("[IMG]", "[/IMG]")},
            "unet": {"file": UNET_FILE, "validation": unet_val},
            "vae_decoder": {"file": VAE_FILE, "validation": vae_val},
            "scheduler": scheduler, "latent_channels": int(vae.config.latent_channels), "vae_scale_factor": vae_scale,
            "scaling_factor": float(vae.config.scaling_factor),
            "size_multiple": vae_scale * unet_down,
            "defaults": {**DEFAULTS, "height": size * vae_scale, "width": size * vae_scale},
            "safety_checker": None}}
    return run


def _load_kw(folder: Path) -> dict:
    """diffusers' from_pretrained arguments for a folder saved either way (.bin or .safetensors)."""
    import torch
    safe = any(folder.glob("*.safetensors"))
    return {"torch_dtype": torch.float32, "low_cpu_mem_usage": False, "use_safetensors": safe}


def _describe(config, opset: int) -> dict:
    return {"inputs": {k: {"dynamic": {str(a): n for a, n in v.items()}} for k, v in config.inputs.items()},
            "outputs": {k: {"dynamic": {str(a): n for a, n in v.items()}} for k, v in config.outputs.items()},
            "opset": opset}

