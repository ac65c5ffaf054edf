"""Atomic writes end with the mode a plain write gives (issue 16: concept files, embeddings and LoRAs were 0600)."""
import os
import stat

import pytest

from em_core.atomic import write_atomic, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_new_files_follow_the_umask_like_a_plain_write(tmp_path, umask):
    write_atomic(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"x")
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "plain.bin") == 0o644
    umask(0o027)
    write_json(tmp_path / "b.json", {"a": 1})
    assert mode(tmp_path / "b.json") == 0o640
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "kept.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    write_atomic(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and mode(target) == 0o640


def test_the_exported_files_are_0644(tmp_path, umask, bundle):
    """What the nodes write through em_core: a bundle, embeddings and a LoRA."""
    import torch

    from em_core.concept_file import save_concepts
    from em_core.concepts import ConceptSet
    from em_core.config import LearnConfig
    from em_core.export import export_embeddings, export_lora
    from em_core.state import LearnState
    from em_core.weights import TunedWeights

    dim = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    concepts = ConceptSet(["[v1]", "[v2]"], vectors=torch.randn(2, dim))
    name, param = next((n, p) for n, p in bundle.unet.named_parameters() if p.ndim == 2)
    weights = TunedWeights("full", {f"unet.{name}": torch.randn_like(param) * 1e-3})
    st = LearnState(concepts=concepts, images=[], config=LearnConfig(), masks=[], fixed=[], weights=weights)
    files = [save_concepts(st, bundle, tmp_path / "b.safetensors")]
    files += export_embeddings(concepts, tmp_path / "emb", "n")
    files.append(export_lora(weights, tmp_path / "loras", "n", 2, concepts.names)[0])
    if os.name == "posix":
        assert [mode(f) for f in files] == [0o644] * len(files)
