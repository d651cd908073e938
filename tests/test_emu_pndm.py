"""runtime/pndm.py (numpy) against its twin, diffusers' PNDMScheduler, step by step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scops.runtime.pndm import PNDM, PNDMConfig

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
CONFIGS = {
    "sd": SD,
    "sd-prk": dict(SD, skip_prk_steps=False),
    "defaults": {},
    "trailing-v": dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    "linspace-cosine": dict(SD, timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True,
                            skip_prk_steps=False),
}


def diffusers_scheduler(cfg: dict):
    from diffusers import PNDMScheduler
    return PNDMScheduler.from_config(cfg)


@pytest.mark.parametrize("name, steps", [(n, s) for n in sorted(CONFIGS) for s in (50, 7)] + [("sd", 999)])
def test_numpy_pndm_is_diffusers_pndm(name, steps):
    cfg = CONFIGS[name]
    ref, mine = diffusers_scheduler(cfg), PNDM(PNDMConfig.from_dict(cfg))
    assert np.array_equal(ref.alphas_cumprod.numpy(), mine.alphas_cumprod)     # the tables bit for bit
    ref.set_timesteps(steps)
    timesteps = mine.set_timesteps(steps)
    assert np.array_equal(ref.timesteps.numpy(), timesteps)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 5, 3), dtype=np.float32)
    xr = torch.from_numpy(x.copy())
    for t in timesteps:
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        x = mine.step(eps, t, x)
        xr = ref.step(torch.from_numpy(eps), int(t), xr).prev_sample
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, xr.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(xr.numpy()).max()))


def test_sd_timesteps_are_leading_with_offset_and_the_repeated_first():
    s = PNDM(PNDMConfig.from_dict(SD))
    t = s.set_timesteps(50)
    assert t[:4].tolist() == [981, 961, 961, 941] and t[-1] == 1 and len(t) == 51


def test_steps_past_the_training_schedule_are_refused():
    s = PNDM(PNDMConfig.from_dict(SD))
    assert s.max_steps() == 999                  # leading spacing + offset 1: 1000 steps reach t = 1000
    with pytest.raises(ValueError, match="reach timestep 1000"):
        s.set_timesteps(1000)


def test_config_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        PNDMConfig.from_dict({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        PNDMConfig.from_dict({"prediction_type": "sample"})
    with pytest.raises(RuntimeError, match="set_timesteps"):
        PNDM(PNDMConfig()).step(np.zeros(3, np.float32), 10, np.zeros(3, np.float32))
