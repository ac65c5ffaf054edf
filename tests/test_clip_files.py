"""CLIP tokenizer folders that both transformers majors read: vocab.json + merges.txt beside 5.x's
tokenizer.json (em_core/model_io/clip_files.py, docs/dependencies.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from em_core.model_io import clip_files
from em_core.model_io.clip_files import clip_tokenizer_from_files, load_clip_tokenizer, save_clip_tokenizer
from em_core.model_io.single_file import clip_tokenizer
from em_core.tiny_world.scenes import random_scene
from em_core.tiny_world.tokenizer_build import build_vocab, save_tokenizer

SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "em_core" / "tiny_world" / "model" / "tokenizer"
PROMPTS = ["a photo of a dog, running in the Grass!", "naïve café 123 <|endoftext|> x"] + [
    random_scene(i, size=64).caption for i in range(20)]


def _same_ids(a, b) -> bool:
    return all(a(p).input_ids == b(p).input_ids for p in PROMPTS)


@pytest.mark.skipif(not SHIPPED_TOKENIZER.is_dir(), reason="the shipped tiny-world model is missing")
def test_the_shipped_tiny_world_tokenizer_has_the_files_transformers_4_reads():
    folder_tok = load_clip_tokenizer(SHIPPED_TOKENIZER)
    files_tok = clip_tokenizer_from_files(SHIPPED_TOKENIZER / "vocab.json", SHIPPED_TOKENIZER / "merges.txt",
                                          model_max_length=folder_tok.model_max_length)
    assert len(files_tok) == len(folder_tok) and _same_ids(files_tok, folder_tok)


def test_a_saved_tokenizer_folder_holds_vocab_and_merges_that_tokenize_alike(tmp_path):
    tok = clip_tokenizer(pad_token="!")
    save_clip_tokenizer(tok, tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    lines = (tmp_path / "t" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == len(tok) and lines[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in lines[1:])
    again = clip_tokenizer_from_files(tmp_path / "t" / "vocab.json", tmp_path / "t" / "merges.txt",
                                      pad_token="!", model_max_length=77)
    assert _same_ids(again, tok)
    reloaded = load_clip_tokenizer(tmp_path / "t")
    assert reloaded.pad_token == "!" and reloaded.pad_token_id == tok.pad_token_id and _same_ids(reloaded, tok)


def test_the_tiny_tokenizer_is_built_from_its_own_vocabulary(tmp_path):
    tok = save_tokenizer(tmp_path / "t", words=["red", "circle"])
    vocab, merges = build_vocab(["red", "circle"])
    assert tok.get_vocab() == vocab
    assert (tmp_path / "t" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == merges
    assert tok("red circle", add_special_tokens=False).input_ids == [vocab["red</w>"], vocab["circle</w>"]]


def test_transformers_4_is_told_which_files_a_folder_lacks(tmp_path, monkeypatch):
    folder = tmp_path / "tokenizer"
    save_clip_tokenizer(clip_tokenizer(), folder)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    if not (folder / "tokenizer.json").is_file():  # 4.x writes no tokenizer.json: give it 5.x's layout
        shutil.copyfile(SHIPPED_TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
    monkeypatch.setattr(clip_files, "TRANSFORMERS_MAJOR", 4)
    with pytest.raises(FileNotFoundError, match=r"lacks vocab\.json and merges\.txt \(it has only tokenizer\.json"):
        load_clip_tokenizer(folder)


def test_a_missing_vocabulary_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        clip_tokenizer_from_files(tmp_path / "nowhere.json", tmp_path / "merges.txt")


def test_every_word_a_tiny_tokenizer_knows_is_one_token(tmp_path):
    # "red" first gives the merge "r e", which BPE applies inside "green" before any merge of a
    # g-r-e-e-n chain; merges must chain on from those pieces or "green" splits into four.
    from em_core.tiny_world.scenes import WORDS

    tok = save_tokenizer(tmp_path / "t", words=WORDS, max_length=32)
    assert [w for w in WORDS if tok.tokenize(w) != [w + "</w>"]] == []
    assert tok.tokenize("a red green") == ["a</w>", "red</w>", "green</w>"]
