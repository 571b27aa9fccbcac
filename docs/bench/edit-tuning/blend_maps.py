"""Where do emoji-sd's word maps say the edited word is? The local blend reads its mask from the
cross-attention of the changed words, summed over the steps, at one resolution; this measures, on the
TRAINING-set tuning edits (configs/edits-tuning.yaml), how well each of emoji-sd's attention resolutions
(16², 8², 4² positions of its 16² latent) localises the object, and draws the maps.

    .venv/bin/python docs/bench/edit-tuning/blend_maps.py    # about 2 minutes on 2 CPU cores

Localisation score per resolution: the Pearson correlation, over the 64² pixels, between the changed words'
map (source and target rows summed, nearest-upsampled) and the object's silhouette (input pixels that are not
near-white). Newton–Raphson inversion (10 steps), edit guidance 5, the default control otherwise. Writes
blend_maps.md and blend_maps.png here.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from solvers.inversion import get_inverter
from solvers.inversion.attention_control import AttentionController, controlled_regeneration
from studio.core.conventions import to_model
from studio.core.io import load_image, save_image
from studio.eval.edit_strip import load_edits, resolve_edit_image
from studio.workflows import editing

HERE = Path(__file__).parent


def word_map(controller: AttentionController, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(1, 1, size, size) the changed words' map at layer size ``hw`` (source and target rows summed),
    min-max normalised."""
    m = controller.word_maps(hw).sum(0, keepdim=True)
    m = F.interpolate(m, size=(size, size), mode="nearest")
    return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def main() -> None:
    prior = editing.latent_prior_for(None)
    settings = editing.control_settings("auto")
    fn, w = get_inverter("newton")
    scores: dict[tuple[int, int], list[float]] = {}
    rows = []
    for spec in load_edits("configs/edits-tuning.yaml"):
        image = load_image(resolve_edit_image(spec.image))
        with torch.no_grad():
            z0 = prior.encode(to_model(image))
        inv = fn(prior, z0, prompt=spec.source, guidance=w, steps=10)
        controller = AttentionController(settings, prior.tokenizer, spec.source, spec.target,
                                         prior.embed("").shape[1], tuple(z0.shape[-2:]))
        controlled_regeneration(prior, inv, spec.target, settings, 5.0, controller=controller)
        silhouette = (image.min(1, keepdim=True).values < 0.9).float()
        tiles = [image]
        for hw in sorted(controller.maps, reverse=True):
            m = word_map(controller, hw, image.shape[-1])
            scores.setdefault(hw, []).append(correlation(m, silhouette))
            tiles.append(m.expand(1, 3, -1, -1).cpu())
        rows.append(torch.cat(tiles, -1))
    save_image(torch.cat(rows, -2), HERE / "blend_maps.png")
    table = ["| attention layer (positions) | localisation (correlation with the silhouette) | per edit |",
             "|---|---|---|"]
    for hw in sorted(scores, reverse=True):
        per = " ".join(f"{s:+.2f}" for s in scores[hw])
        table.append(f"| {hw[0]}×{hw[1]} | {statistics.fmean(scores[hw]):+.2f} | {per} |")
    (HERE / "blend_maps.md").write_text(
        "# Which attention resolution localises the edited words on emoji-sd\n\n"
        "Command: `.venv/bin/python docs/bench/edit-tuning/blend_maps.py` (tuning edits, training-set "
        "emoji). Each row of blend_maps.png: the input, then the changed words' map at 16², 8² and 4² "
        "positions.\n\n"
        + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
