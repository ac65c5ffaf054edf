import pytest
import torch

from em_core.concepts import (ConceptSet, concept_names, encode_prompts, injected, register_tokens,
                              to_token_text)


def test_concept_names_in_order_without_repeats():
    assert concept_names("[v3] and [v1] shake hands with [v3]") == ["[v3]", "[v1]"]
    assert concept_names("a photo of a dog") == []


def test_each_concept_is_one_new_token(bundle):
    n_before = len(bundle.tokenizer)
    ids = register_tokens(bundle.tokenizer, bundle.text_encoder, ["[v1]", "[v2]"])
    assert ids == [n_before, n_before + 1]
    assert register_tokens(bundle.tokenizer, bundle.text_encoder, ["[v1]", "[v2]"]) == ids  # idempotent
    assert bundle.text_encoder.get_input_embeddings().num_embeddings >= n_before + 2
    tokens = bundle.tokenizer(to_token_text("a photo of [v1] and [v2]")).input_ids
    assert tokens.count(ids[0]) == 1 and tokens.count(ids[1]) == 1


def test_registered_tokens_are_found_without_copying_the_vocabulary(bundle, monkeypatch):
    # Every token step passes through register_tokens; get_vocab() copies CLIP's 49k entries
    # (milliseconds a call), so once the tokens exist it must not be called.
    ids = register_tokens(bundle.tokenizer, bundle.text_encoder, ["[v1]", "[v2]"])

    def no_copy():
        raise AssertionError("get_vocab called for tokens that are already registered")

    monkeypatch.setattr(bundle.tokenizer, "get_vocab", no_copy)
    assert register_tokens(bundle.tokenizer, bundle.text_encoder, ["[v2]", "[v1]"]) == ids[::-1]
    cs = ConceptSet(["[v1]", "[v2]"], {}, torch.zeros(2, bundle.text_encoder.config.hidden_size))
    with injected(bundle, cs) as got:
        assert got == ids


def test_init_from_word_and_random(bundle):
    cs = ConceptSet.create(bundle, ["[v1]", "[v2]"], {"[v1]": "dog"}, seed=0)
    table = bundle.text_encoder.get_input_embeddings().weight
    dog = bundle.tokenizer("dog", add_special_tokens=False).input_ids
    assert torch.allclose(cs.vectors[0], table[dog].mean(0))
    assert not torch.allclose(cs.vectors[1], cs.vectors[0])
    again = ConceptSet.create(bundle, ["[v1]", "[v2]"], {"[v1]": "dog"}, seed=0)
    assert torch.equal(again.vectors, cs.vectors)
    with pytest.raises(ValueError, match=r"\[v9\].*appear in no prompt"):
        ConceptSet.create(bundle, ["[v1]"], {"[v9]": "dog"})


def test_injection_is_scoped_and_differentiable(bundle):
    cs = ConceptSet.create(bundle, ["[v1]"], {"[v1]": "dog"})
    vec = torch.nn.Parameter(torch.randn_like(cs.vectors))
    _, plain = encode_prompts(bundle, ["a photo of [v1]"])
    with injected(bundle, cs, vec):
        _, inj = encode_prompts(bundle, ["a photo of [v1]"])
    assert not torch.allclose(plain, inj)
    inj.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    _, after = encode_prompts(bundle, ["a photo of [v1]"])
    assert torch.equal(plain, after)  # the hook is gone
    # Prompts without the concept are untouched by the injection.
    _, a = encode_prompts(bundle, ["a photo of a dog"])
    with injected(bundle, cs, vec):
        _, b = encode_prompts(bundle, ["a photo of a dog"])
    assert torch.equal(a, b)


def test_bad_concept_name(bundle):
    with pytest.raises(ValueError, match="not of the form"):
        register_tokens(bundle.tokenizer, bundle.text_encoder, ["v1"])


def test_concept_ids_and_prompts_never_use_an_unregistered_placeholder(tiny_dir):
    """A fresh model has no concept tokens: ids come registered, and encoding refuses to split them."""
    from em_core.concepts import ConceptSet, encode_prompts
    from em_core.model import load_bundle

    first = load_bundle(tiny_dir)
    cs = ConceptSet.create(first, ["[v1]", "[v2]"])
    fresh = load_bundle(tiny_dir)
    unk = fresh.tokenizer.unk_token_id
    with pytest.raises(RuntimeError, match="not registered"):
        encode_prompts(fresh, ["a photo of [v1]"])
    ids = cs.token_ids(fresh)
    assert unk not in ids and len(set(ids)) == 2
    assert ids == cs.token_ids(first)
