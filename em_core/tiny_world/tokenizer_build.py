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


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is known."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_vocab(words=DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges in CLIP's layout: bytes, bytes ending a word, whole words, specials."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        letters = list(word[:-1]) + [word[-1] + "</w>"]
        for k in range(2, len(letters) + 1):  # every prefix is a token (the ids tokenizers built before keep)
            prefix = "".join(letters[:k])
            if prefix not in seen:
                vocab.append(prefix)
                seen.add(prefix)
        # Merges chain on from what the merges so far make of the word: BPE applies them by rank,
        # so a chain that ignored earlier words' merges never fired ("red"'s "r e" left "green"
        # as g|re|e|n in the tokenizers built before this).
        pieces = _bpe(letters, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in ranks:
                ranks[(left, right)] = len(merges)
                merges.append(f"{left} {right}")
            left = left + right
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
