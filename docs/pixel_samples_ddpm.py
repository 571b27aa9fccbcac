"""64 unconditional `emoji-pixel` samples with DDPM ancestral sampling (the model card's grid uses DDIM, eta 0).

    python docs/pixel_samples_ddpm.py [STEPS=250] [OUT=docs/emoji-pixel-samples-ddpm250.png]

Seed 0, EMA weights as shipped, not selected; 1 torch thread (~4.5 min on this CPU at 250 steps).
"""

import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from models.registry import resolve_model_path
from studio.train import save_grid

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 250
out = Path(sys.argv[2] if len(sys.argv) > 2 else f"docs/emoji-pixel-samples-ddpm{steps}.png")
torch.set_num_threads(1)
folder = Path(resolve_model_path("emoji-pixel"))
unet = UNet2DModel.from_pretrained(folder / "unet").eval()
scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
scheduler.set_timesteps(steps)
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 3, 32, 32, generator=g)
with torch.no_grad():
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
save_grid(((x + 1) / 2).clamp(0, 1), out, nrow=8)
print(f"wrote {out}")
