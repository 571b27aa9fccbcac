"""The emoji dataset the embedded models are trained on, rendered offline from Noto Color Emoji.

Source: the Debian package ``fonts-noto-color-emoji`` (font licence SIL OFL-1.1), which ``setup.sh``
installs. Every fully-qualified emoji of the ``emoji`` package (single code points and sequences: skin
tones, ZWJ families and professions, flags, keycaps) is drawn with Pillow's raqm layout, which applies the
font's ligatures so that a supported sequence becomes one glyph. A sequence the font does not ligate draws
as several glyphs and is skipped, as are blank glyphs.

Each glyph is cropped to its bounding box, padded to a square, composited on white and resized with
LANCZOS to 32x32 and 64x64. Captions are the CLDR names (``"grinning face"``, ``"waving hand: medium
skin tone"``, ``"flag: United States"``, ``"keycap: #"``). Everything is deterministic.

The split is by *concept*: a concept is the sequence with skin-tone modifiers, variation selectors and
gender signs removed, so ``👋``, ``👋🏽`` and ``🏃‍♀️``/``🏃`` each fall on one side of the split together.
A fixed, seeded choice of concepts is held out; their images never appear in training and are shipped in
``examples/emoji/`` as the demo and benchmark images.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from studio.core.errors import StudioError

FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
#: The CBDT strike of Noto Color Emoji: its glyphs are bitmaps drawn at this size only.
FONT_SIZE = 109
SIZES = (32, 64)
#: How many concepts (with all their variants) are held out of training.
HELD_OUT_CONCEPTS = 40
SPLIT_SEED = 2024

_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_VARIATION = {"\ufe0f", "\ufe0e"}
_GENDER = ("\u200d\u2640", "\u200d\u2642")
_TONE_RE = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")


@dataclass(frozen=True)
class EmojiDataset:
    """Rendered emoji: ``images[size]`` is uint8 ``(N, size, size, 3)``; one caption and concept per row."""

    images: dict[int, np.ndarray]
    captions: list[str]
    sequences: list[str]
    concepts: list[str]
    held_out: np.ndarray  # bool (N,)

    def split(self, held_out: bool) -> "EmojiDataset":
        keep = self.held_out == held_out
        idx = np.flatnonzero(keep)
        return EmojiDataset(
            images={s: a[idx] for s, a in self.images.items()},
            captions=[self.captions[i] for i in idx],
            sequences=[self.sequences[i] for i in idx],
            concepts=[self.concepts[i] for i in idx],
            held_out=self.held_out[idx],
        )

    def __len__(self) -> int:
        return len(self.captions)


def find_font() -> Path:
    for p in FONT_PATHS:
        if Path(p).is_file():
            return Path(p)
    raise StudioError(
        "Noto Color Emoji font not found (looked in " + ", ".join(FONT_PATHS) + "); "
        "install the Debian package: apt-get install fonts-noto-color-emoji (setup.sh does this)"
    )


def caption_of(sequence: str) -> str:
    """CLDR-style name: ``:waving_hand_medium_skin_tone:`` → ``waving hand: medium skin tone``."""
    import emoji

    data = emoji.EMOJI_DATA.get(sequence)
    if data is None:
        return unicodedata.name(sequence, "emoji").lower()
    name = data["en"].strip(":").replace("_", " ")
    # "waving hand medium skin tone" -> "waving hand: medium skin tone" (CLDR style), tones comma-separated
    tones = list(_TONE_RE.finditer(name))
    if tones and tones[0].start() > 0:
        head = name[: tones[0].start()].rstrip()
        name = head + ": " + ", ".join(m.group(0).strip() for m in tones)
    if name.startswith("keycap "):
        name = "keycap: " + name[len("keycap "):]
    if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence) or sequence.startswith("\U0001F3F4\U000E0067"):
        name = "flag: " + name
    return name if name.startswith("flag: ") else name.lower()


def concept_of(sequence: str) -> str:
    """The sequence without skin tones, variation selectors and gender signs."""
    s = sequence
    for g in _GENDER:
        s = s.replace(g, "")
    return "".join(c for c in s if c not in _SKIN_TONES and c not in _VARIATION) or sequence


def _render_one(font: ImageFont.FreeTypeFont, sequence: str) -> Image.Image | None:
    """The glyph on white, square, at full font resolution; ``None`` when blank or not one glyph."""
    canvas = Image.new("RGBA", (FONT_SIZE * 6, FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), sequence, font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if w > FONT_SIZE * 1.45 or w < 8 or h < 8:  # several glyphs: the font has no ligature for it
        return None
    glyph = canvas.crop(bbox)
    side = max(w, h)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    return square.convert("RGB")


def emoji_sequences() -> list[str]:
    """All fully-qualified emoji of the ``emoji`` package, in a fixed order."""
    import emoji

    return sorted(s for s, d in emoji.EMOJI_DATA.items() if d["status"] == emoji.STATUS["fully_qualified"])


def held_out_concepts(concepts: list[str], count: int = HELD_OUT_CONCEPTS,
                      seed: int = SPLIT_SEED) -> set[str]:
    """A fixed choice of concepts: the ``count`` smallest seeded hashes (stable across Python versions)."""
    sizes = Counter(concepts)
    # Concepts with more than 6 variants (two-person skin-tone grids of 25) would swamp the examples.
    unique = sorted(c for c, n in sizes.items() if n <= 6)
    key = lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest()  # noqa: E731
    return set(sorted(unique, key=key)[:count])


def render_emoji(sizes: tuple[int, ...] = SIZES, held_out_count: int = HELD_OUT_CONCEPTS) -> EmojiDataset:
    """Render every supported emoji at each size (about 10 s) and split off ``held_out_count`` concepts."""
    font = ImageFont.truetype(str(find_font()), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    images: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    captions, sequences = [], []
    for seq in emoji_sequences():
        img = _render_one(font, seq)
        if img is None:
            continue
        for s in sizes:
            images[s].append(np.asarray(img.resize((s, s), Image.Resampling.LANCZOS), dtype=np.uint8))
        captions.append(caption_of(seq))
        sequences.append(seq)
    if not sequences:
        raise StudioError("no emoji rendered: is Pillow built with raqm and the font a colour font?")
    concepts = [concept_of(s) for s in sequences]
    held = held_out_concepts(concepts, held_out_count)
    return EmojiDataset(
        images={s: np.stack(a) for s, a in images.items()},
        captions=captions,
        sequences=sequences,
        concepts=concepts,
        held_out=np.array([c in held for c in concepts]),
    )


def save_dataset(ds: EmojiDataset, folder: str | Path) -> Path:
    """``emoji-{size}.safetensors`` (uint8 images + held-out flags) and ``captions.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for s, arr in ds.images.items():
        save_file(
            {"images": torch.from_numpy(arr), "held_out": torch.from_numpy(ds.held_out.astype(np.uint8))},
            str(folder / f"emoji-{s}.safetensors"),
        )
    meta = [
        {"caption": c, "sequence": q, "concept": k, "held_out": bool(h)}
        for c, q, k, h in zip(ds.captions, ds.sequences, ds.concepts, ds.held_out)
    ]
    (folder / "captions.json").write_text(json.dumps(meta, ensure_ascii=False, indent=0))
    return folder


def load_dataset(folder: str | Path) -> EmojiDataset:
    folder = Path(folder)
    meta_path = folder / "captions.json"
    if not meta_path.is_file():
        raise StudioError(f"no emoji dataset in {folder}: run `studio data emoji --out {folder}` first")
    meta = json.loads(meta_path.read_text())
    images = {}
    held = None
    for p in sorted(folder.glob("emoji-*.safetensors")):
        t = load_file(str(p))
        images[int(p.stem.split("-")[1])] = t["images"].numpy()
        held = t["held_out"].numpy().astype(bool)
    return EmojiDataset(
        images=images,
        captions=[m["caption"] for m in meta],
        sequences=[m["sequence"] for m in meta],
        concepts=[m["concept"] for m in meta],
        held_out=held if held is not None else np.array([m["held_out"] for m in meta]),
    )


def write_examples(ds: EmojiDataset, folder: str | Path) -> Path:
    """The held-out images as PNGs (``{index:03d}-{size}.png``) plus ``captions.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = ds.split(held_out=True)
    entries = []
    for i, (cap, seq) in enumerate(zip(held.captions, held.sequences)):
        files = {}
        for s, arr in held.images.items():
            name = f"{i:03d}-{s}.png"
            Image.fromarray(arr[i]).save(folder / name, optimize=True)
            files[str(s)] = name
        entries.append({"caption": cap, "sequence": seq, "files": files})
    (folder / "captions.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1))
    return folder


# ---------------------------------------------------------------------------------------- training batches


def load_training_images(data_dir: str | Path, size: int,
                         limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Training split (held-out concepts removed) as uint8 (N,3,size,size) and captions."""
    ds = load_dataset(data_dir)
    if size not in ds.images:
        raise StudioError(f"dataset {data_dir} has sizes {sorted(ds.images)}, not {size}")
    train = ds.split(held_out=False)
    images = torch.from_numpy(train.images[size]).permute(0, 3, 1, 2).contiguous()
    captions = list(train.captions)
    if limit is not None:
        images, captions = images[:limit], captions[:limit]
    return images, captions


def load_held_out_images(data_dir: str | Path, size: int) -> torch.Tensor:
    """The held-out split as uint8 (N,3,size,size)."""
    ds = load_dataset(data_dir).split(held_out=True)
    return torch.from_numpy(ds.images[size]).permute(0, 3, 1, 2).contiguous()


def to_model_range(batch_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float32 in [-1, 1] on ``device``."""
    return batch_uint8.to(device=device, dtype=torch.float32) / 127.5 - 1.0
