import pytest
import torch

from em_core.concepts import ConceptSet, concept_names, encode_prompts, injected, tokenize


def test_concept_names_in_order_without_repeats():
    assert concept_names("[v3] and [v1] shake hands with [v3]") == ["[v3]", "[v1]"]
    assert concept_names("a photo of a dog") == []


def test_each_concept_is_one_computed_id_and_nothing_shared_changes(bundle):
    tok, te = bundle.tokenizer, bundle.text_encoder
    n_before, rows = len(tok), te.get_input_embeddings().weight.detach().clone()
    cs = ConceptSet.create(bundle, ["[v1]", "[v2]"], {"[v1]": "red"})
    ids = cs.token_ids(bundle)
    assert ids == [n_before, n_before + 1]
    with injected(bundle, cs) as got:
        assert got == ids
        tokens, _ = encode_prompts(bundle, ["a photo of [v1] and [v2]"])
    assert tokens[0].tolist().count(ids[0]) == 1 and tokens[0].tolist().count(ids[1]) == 1
    # The shared tokenizer and embedding table are as they were (issue 16, part 3).
    assert len(tok) == n_before and torch.equal(te.get_input_embeddings().weight, rows)


def test_tokenize_matches_the_tokenizer_on_plain_prompts(bundle):
    tok = bundle.tokenizer
    for prompt in ["a photo of a dog", "", "red " * 200]:
        want = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        assert torch.equal(tokenize(tok, [prompt]), want)


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
    with injected(bundle, cs):
        _, plain = encode_prompts(bundle, ["a photo of [v1]"])
    with injected(bundle, cs, vec):
        _, inj = encode_prompts(bundle, ["a photo of [v1]"])
    assert not torch.allclose(plain, inj)
    inj.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="not injected"):
        encode_prompts(bundle, ["a photo of [v1]"])  # the hooks are gone
    emb = bundle.text_encoder.get_input_embeddings()
    assert not emb._forward_hooks and not emb._forward_pre_hooks
    # Prompts without the concept are untouched by the injection.
    _, a = encode_prompts(bundle, ["a photo of a dog"])
    with injected(bundle, cs, vec):
        _, b = encode_prompts(bundle, ["a photo of a dog"])
    assert torch.equal(a, b)


def test_bad_concept_name(bundle):
    with pytest.raises(ValueError, match="not of the form"):
        ConceptSet.create(bundle, ["v1"])


def test_concept_ids_are_the_same_in_a_fresh_model_and_prompts_refuse_uninjected_concepts(tiny_dir):
    """A fresh process must get the ids the run was trained with (issue 13)."""
    from em_core.model_io import load_bundle

    first = load_bundle(tiny_dir)
    cs = ConceptSet.create(first, ["[v1]", "[v2]"])
    fresh = load_bundle(tiny_dir)
    assert cs.token_ids(fresh) == cs.token_ids(first)
    assert fresh.tokenizer.unk_token_id not in cs.token_ids(fresh)
    with pytest.raises(RuntimeError, match="not injected"):
        encode_prompts(fresh, ["a photo of [v1]"])
    with injected(fresh, cs):
        a = encode_prompts(fresh, ["a photo of [v1]"])[1]
    with injected(first, cs):
        b = encode_prompts(first, ["a photo of [v1]"])[1]
    assert torch.equal(a, b)
