"""Builds a small CLIP BPE tokenizer offline, so tiny models need no downloaded vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from ..model_io.clip_files import clip_tokenizer_from_files, load_clip_tokenizer, save_clip_tokenizer

# Words a tiny model knows whole; anything else falls back to byte-level pieces.
DEFAULT_WORDS = (
    "a photo of and in on the with at to man woman person dog cat room background "
    "object thing red green blue yellow white black circle square triangle striped dotted "
    "plain grass sand wall floor sky robot shaking hands front"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(words=DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges in CLIP's layout: bytes, bytes ending a word, whole words, specials."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_tokenizer(directory: str | Path, words=DEFAULT_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """Writes vocab.json and merges.txt to `directory` and returns the loaded tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = clip_tokenizer_from_files(directory / "vocab.json", directory / "merges.txt", model_max_length=max_length)
    save_clip_tokenizer(tok, directory)
    return load_clip_tokenizer(directory)
