"""CLIP tokenizers made from, loaded from and saved with vocab.json + merges.txt, the files both
transformers majors read. transformers 4.x's CLIPTokenizer takes (vocab_file, merges_file) and loads a
folder only through those two files; 5.x's takes (vocab, merges) and its save_pretrained writes
tokenizer.json alone, which 4.x cannot load. Building positionally and saving all three keeps a
folder readable by either (docs/dependencies.md)."""
from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

from ..atomic import write_atomic

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def clip_tokenizer_from_files(vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> CLIPTokenizer:
    """A CLIPTokenizer from a vocab.json and a merges.txt; kwargs (pad_token, model_max_length, ...)
    go to the tokenizer."""
    for path in (vocab_json, merges_txt):
        if not Path(path).is_file():
            raise FileNotFoundError(f"CLIP tokenizer: {path} does not exist")
    # Positional on purpose: the parameters are vocab_file / merges_file in 4.x and vocab / merges in
    # 5.x, and both take a file path there.
    return CLIPTokenizer(str(vocab_json), str(merges_txt), **kwargs)


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The tokenizer saved in `folder`, offline. Under transformers 4.x a folder with only
    tokenizer.json (as transformers 5 saves it) is refused with a message naming it, not with 4.x's
    misleading request for the protobuf library."""
    folder = Path(folder)
    if TRANSFORMERS_MAJOR < 5:
        lacking = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
        if lacking:
            saved_by_5 = " (it has only tokenizer.json, as transformers 5 saves it)" if (folder / "tokenizer.json").is_file() else ""
            raise FileNotFoundError(
                f"tokenizer: {folder} lacks {' and '.join(lacking)}{saved_by_5}; transformers "
                f"{transformers.__version__}'s CLIPTokenizer reads only vocab.json + merges.txt. Upgrade "
                "transformers to 5.x, or re-save the tokenizer with em_core.model_io.clip_files.save_clip_tokenizer")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def save_clip_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """tokenizer.save_pretrained(folder), plus vocab.json and merges.txt where that wrote only
    tokenizer.json (transformers 5), taken from the tokenizer's own BPE model."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise TypeError(f"tokenizer: cannot write vocab.json + merges.txt to {folder}: "
                        f"{type(tokenizer).__name__} has no BPE model to take them from")
    # tokenizers writes a merge as "a b" (older) or ["a", "b"] (newer); merges.txt holds "a b" lines
    # after a version line, which 4.x's CLIPTokenizer skips.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = model["vocab"]

    def write_vocab(tmp):
        Path(tmp).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")

    def write_merges(tmp):
        Path(tmp).write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")

    write_atomic(folder / "vocab.json", write_vocab)
    write_atomic(folder / "merges.txt", write_merges)
    return folder
