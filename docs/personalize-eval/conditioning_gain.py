"""How much can any prompt lower the diffusion loss on a model? The ceiling behind issue 6's ≥ 30 % bar.

Textual inversion can only lower the concept loss as far as the model's text conditioning moves its
ε-prediction. This measures that on the model's *own training data*, where the true captions are the
best prompts there are: for image groups of held-in concepts (the 3 held-in concepts with the most
variants, plus the first 6 held-in flags; first 6 images of each, a fixed rule, no picking) and for the
held-out concepts with enough images for ``studio personalize-eval``, the ε-MSE under the empty prompt,
under the group's first caption word (the initializer-word analogue) and under each image's own caption,
overall and per
timestep quarter (stratified draws: the same (t, ε) for every prompt, so the differences are paired).

    python docs/personalize-eval/conditioning_gain.py [--model emoji-sd] [--draws 64] [--out FILE.md]

Needs the dataset (``studio data emoji``) for the held-in images.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch

from studio.core.io import load_image
from studio.eval.personalize_eval import MIN_IMAGES, list_concepts
from studio.training.emoji_data import EmojiDataset, load_dataset
from studio.training.objective import forward_process
from studio.training.textual_inversion import concept_latents, diffusion_loss, prompt_condition
from studio.workflows.personalize import load_sd_pipeline

QUARTERS = 4


@torch.no_grad()
def losses_by_quarter(pipe, images: torch.Tensor, prompts: dict[str, list[str]], draws: int,
                      seed: int) -> dict:
    """{prompt name: [loss in each timestep quarter]}; ``draws`` (t, ε) per image per quarter."""
    lat = concept_latents(pipe, images)
    noising = forward_process(pipe.scheduler.config)
    n_t = len(noising.alphas_cumprod)
    conds = {name: prompt_condition(pipe, p, len(lat)) for name, p in prompts.items()}
    out = {name: [0.0] * QUARTERS for name in prompts}
    g = torch.Generator().manual_seed(seed)
    for q in range(QUARTERS):
        lo, hi = q * n_t // QUARTERS, (q + 1) * n_t // QUARTERS
        for _ in range(draws):
            t = torch.randint(lo, hi, (len(lat),), generator=g)
            noise = torch.randn(lat.shape, generator=g)
            for name, cond in conds.items():
                out[name][q] += float(diffusion_loss(pipe.unet, noising, lat, cond, t, noise)) / draws
    return out


def held_in_groups(ds: EmojiDataset, per_group: int = 6) -> list[tuple[str, list[int]]]:
    by_concept = collections.defaultdict(list)
    for i, (concept, held) in enumerate(zip(ds.concepts, ds.held_out)):
        if not held:
            by_concept[concept].append(i)
    largest = sorted(by_concept.values(), key=len, reverse=True)[:3]
    flags = [i for i, (c, held) in enumerate(zip(ds.captions, ds.held_out))
             if c.startswith("flag:") and not held]
    return [(ds.captions[g[0]], g[:per_group]) for g in largest] + [("flags", flags[:per_group])]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="emoji-sd")
    ap.add_argument("--data", default="runs/data/emoji")
    ap.add_argument("--draws", type=int, default=64, help="(t, ε) draws per image per timestep quarter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the Markdown table here as well")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_sd_pipeline(args.model)
    ds = load_dataset(args.data)
    pixels = torch.from_numpy(ds.images[64])
    sets = []
    for name, idx in held_in_groups(ds):
        own = [ds.captions[i] for i in idx]
        sets.append((f"held-in: {name} (×{len(idx)})", pixels[idx].permute(0, 3, 1, 2).float() / 255, own))
    for concept in [c for c in list_concepts(size=64) if len(c.files) >= MIN_IMAGES]:
        held_out = torch.cat([load_image(f) for f in concept.files])
        sets.append((f"held-out: {concept.name} (×{len(concept.files)})", held_out, concept.captions))

    lines = [f"Model `{args.model}`; {args.draws} (t, ε) draws per image per timestep quarter "
             f"(seed {args.seed}), "
             "the same draws for every prompt. Word: the first word of the group's first caption. "
             "Drops are relative to the word's loss (the initializer-word analogue) and to the empty prompt.",
             "", "| images | prompt | loss | t∈[0,250) | [250,500) | [500,750) | [750,1000) | own vs word "
                 "| own vs empty |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, images, own in sets:
        word = own[0].split()[0].rstrip(":")
        res = losses_by_quarter(pipe, images, {"empty": [""], "word": [word], "own": own}, args.draws,
                                args.seed)
        mean = {k: sum(v) / QUARTERS for k, v in res.items()}
        for key, label in (("empty", "''"), ("word", f"'{word}'"), ("own", "own captions")):
            extra = (f"{100 * (mean['word'] - mean['own']) / mean['word']:.1f}% | "
                     f"{100 * (mean['empty'] - mean['own']) / mean['empty']:.1f}%") if key == "own" else " | "
            lines.append(f"| {name if key == 'empty' else ''} | {label} | {mean[key]:.5f} | "
                         + " | ".join(f"{v:.4f}" for v in res[key]) + f" | {extra} |")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines) + "\n\nCommand: `python docs/personalize-eval/conditioning_gain.py " \
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
