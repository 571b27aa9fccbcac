"""A small CLIP tokenizer built offline from the emoji captions, in CLIP's exact layout.

CLIP's vocabulary (Radford et al. 2021) starts with the 256 byte-level characters, then the same 256 with
the end-of-word marker ``</w>``, then one token per BPE merge, then ``<|startoftext|>`` and
``<|endoftext|>``. Keeping that layout means every byte has a token: any prompt, in any script or with
emoji, encodes to real tokens instead of silently collapsing to ``<|endoftext|>`` (which would end the
prompt for the text encoder). The merges are learned here by plain byte-pair counting (Sennrich et al.
2016) over the words that CLIP's own pre-tokenizer produces, so training and use agree.

The result is written as ``vocab.json`` + ``merges.txt`` (what ``CLIPTokenizer.from_pretrained`` reads)
besides ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable character table (printable Latin-1 bytes map to themselves)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _base_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=base_vocab([]), merges=[], model_max_length=77)


def base_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def learn_merges(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    tok = _base_tokenizer()
    backend = tok.backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            symbols = list(word)
            symbols[-1] = symbols[-1] + END_OF_WORD
            words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        if merged not in seen:  # a token reachable by two merge paths is listed once
            merges.append(best)
            seen.add(merged)
        new_words: Counter[tuple[str, ...]] = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


def build_clip_tokenizer(texts: list[str], num_merges: int = 1500, model_max_length: int = 77):
    """A ``CLIPTokenizer`` whose vocabulary covers every byte plus merges learned from ``texts``."""
    from transformers import CLIPTokenizer

    merges = learn_merges(texts, num_merges)
    return CLIPTokenizer(vocab=base_vocab(merges), merges=list(merges),
                         model_max_length=model_max_length)


def save_clip_tokenizer(tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` plus ``vocab.json``/``merges.txt`` (transformers 5 writes only tokenizer.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
