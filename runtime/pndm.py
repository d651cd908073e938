"""PNDM sampler in numpy: the twin of diffusers' PNDMScheduler (tests/test_emu_pndm.py compares
the two step by step), so the image decoder runs without torch.

    sched = PNDM(PNDMConfig.from_dict(manifest_scheduler_config))
    for t in sched.set_timesteps(50):
        latents = sched.step(unet(latents, t), t, latents)

Pseudo numerical methods (Liu et al. 2022, arXiv 2202.09778): a Runge-Kutta warm-up (PRK, 12
model calls over the first 3 steps) then linear multistep (PLMS, Adams-Bashforth up to 4th
order). Stable Diffusion's scheduler_config sets skip_prk_steps (PLMS from the start, the
2nd step repeating the 1st timestep and averaging), steps_offset 1 and "leading" spacing:
50 steps at 1000 training steps -> 981, 961, 961, 941, ..., 1.
Arithmetic is float32 in diffusers' order of operations; the beta table follows torch's CPU
float32 linspace (one fused multiply-add per element, from both ends) and its cumulative
product (accumulated in double), so the tables agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

F32 = np.float32


@dataclass(frozen=True)
class PNDMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"            # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: tuple | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"          # epsilon | v_prediction
    timestep_spacing: str = "leading"         # linspace | leading | trailing
    steps_offset: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "PNDMConfig":
        """A diffusers scheduler_config.json; keys PNDM does not read (clip_sample, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        cfg = cls(**kw)
        if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and cfg.trained_betas is None:
            raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not implemented")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {cfg.prediction_type!r} must be epsilon or v_prediction")
        if cfg.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} must be linspace, leading or trailing")
        return cfg


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU: step in float32, then start + step*i
    for the first half and end - step*(n-1-i) for the rest, each rounded once (an FMA)."""
    a, b = F32(start), F32(end)
    step = (b - a) / F32(max(n - 1, 1))
    i = np.arange(n)
    exact = np.where(i < n // 2, np.float64(a) + np.float64(step) * i, np.float64(b) - np.float64(step) * (n - 1 - i))
    return exact.astype(F32)


def make_betas(cfg: PNDMConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, F32)
    if cfg.beta_schedule == "linear":
        return linspace32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":          # latent diffusion: linear in sqrt(beta), then squared
        return linspace32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n) ** 2

    def alpha_bar(t):                                   # squaredcos_cap_v2 (GLIDE's cosine schedule)
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], F32)


class PNDM:
    ORDER = 4

    def __init__(self, cfg: PNDMConfig):
        self.cfg = cfg
        alphas = F32(1.0) - make_betas(cfg)
        self.alphas_cumprod = np.cumprod(alphas, dtype=np.float64).astype(F32)
        self.final_alpha_cumprod = F32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = 0
        self.timesteps = np.zeros(0, np.int64)

    def set_timesteps(self, n: int) -> np.ndarray:
        cfg, self.num_inference_steps = self.cfg, n
        if cfg.timestep_spacing == "linspace":
            base = np.linspace(0, cfg.num_train_timesteps - 1, n).round().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            base = np.arange(0, n) * (cfg.num_train_timesteps // n) + cfg.steps_offset
        else:                                               # trailing
            base = np.round(np.arange(cfg.num_train_timesteps, 0, -cfg.num_train_timesteps / n))[::-1]
            base = base.astype(np.int64) - 1
        base = base.astype(np.int64)
        if cfg.skip_prk_steps:
            # PLMS from the start: the second model call re-evaluates the first timestep
            self.prk_timesteps = np.zeros(0, np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            # 3 Runge-Kutta steps = 12 calls at t, t - ratio/2 (twice), t - ratio over the last 4 of `base`
            half = cfg.num_train_timesteps // n // 2
            prk = base[-self.ORDER:].repeat(2) + np.tile(np.array([0, half]), self.ORDER)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        if self.timesteps.size and self.timesteps.max() >= cfg.num_train_timesteps:
            raise ValueError(f"{n} steps reach timestep {self.timesteps.max()} of {cfg.num_train_timesteps}")
        self.ets: list = []
        self.counter = 0
        self.cur_model_output = F32(0)
        self.cur_sample = None
        return self.timesteps

    def max_steps(self) -> int:
        """The most inference steps whose timesteps stay inside the training schedule."""
        for n in range(self.cfg.num_train_timesteps, 0, -1):
            try:
                PNDM(self.cfg).set_timesteps(n)
                return n
            except ValueError:
                continue
        return 0

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        if self.num_inference_steps == 0:
            raise RuntimeError("set_timesteps must run before step")
        if self.counter < len(self.prk_timesteps) and not self.cfg.skip_prk_steps:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output, timestep, sample):
        ratio = self.cfg.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - (0 if self.counter % 2 else ratio // 2)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = F32(0)
        cur = self.cur_sample if self.cur_sample is not None else sample
        prev = self._prev_sample(cur, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev

    def _step_plms(self, model_output, timestep, sample):
        if not self.cfg.skip_prk_steps and len(self.ets) < 3:
            raise RuntimeError("PLMS steps need the 12 Runge-Kutta steps first")
        ratio = self.cfg.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:                                   # the repeated first timestep: a step from t + ratio to t
            prev_timestep = timestep
            timestep = timestep + ratio
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            model_output = (model_output + e[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        prev = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """x_(t-d) from x_t, formula (9) of the PNDM paper."""
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        if self.cfg.prediction_type == "v_prediction":
            model_output = np.sqrt(a_t) * model_output + np.sqrt(b_t) * sample
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        out = sample_coeff * sample - (a_prev - a_t) * model_output / denom
        return out.astype(F32, copy=False)
