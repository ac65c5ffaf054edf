"""Writes CLIP's BPE tokenizer files (vocab.json, merges.txt) for em_core/model_io/configs/clip_tokenizer.

CLIP's vocabulary is fully determined by its merge list: the 256 byte symbols, the same with
'</w>', one entry per merge, then the two special tokens (49408 in all). The merge list is the
MIT-licensed `bpe_simple_vocab_16e6.txt.gz` that the open_clip_torch wheel on PyPI ships:

    pip download --no-deps -d /tmp/oc open_clip_torch && unzip -o /tmp/oc/*.whl -d /tmp/oc/x
    python tools/make_clip_tokenizer.py /tmp/oc/x/open_clip/bpe_simple_vocab_16e6.txt.gz
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from em_core.tiny_world.tokenizer_build import _bytes_to_unicode

OUT = Path(__file__).resolve().parents[1] / "em_core" / "model_io" / "configs" / "clip_tokenizer"


def main(bpe_path: str) -> None:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
