"""Concept tokens: `[vN]` in prompts, one new tokenizer token and embedding row per concept.

The learned vectors live outside the text encoder and are injected into the embedding
layer's output inside a context, so one loaded model can serve several concept sets and
no existing embedding row ever changes.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

CONCEPT_RE = re.compile(r"\[v(\d+)\]")


def concept_names(prompt: str) -> list[str]:
    """The concept names in a prompt, in order of first appearance, e.g. ['[v1]', '[v3]']."""
    return list(dict.fromkeys(f"[v{m}]" for m in CONCEPT_RE.findall(prompt)))


def placeholder(name: str) -> str:
    """The tokenizer token a concept name maps to."""
    return f"<{name[1:-1]}>"


def to_token_text(prompt: str) -> str:
    """Rewrites `[vN]` into the tokenizer's placeholder tokens."""
    return CONCEPT_RE.sub(lambda m: f" <v{m.group(1)}> ", prompt).strip()


def check_name(name: str) -> str:
    if not CONCEPT_RE.fullmatch(name):
        raise ValueError(f"concept name {name!r} is not of the form [vN] (e.g. [v1])")
    return name


def register_tokens(tokenizer, text_encoder, names) -> list[int]:
    """Adds the placeholder tokens (idempotent) and grows the embedding so their ids exist."""
    tokens = [placeholder(check_name(n)) for n in names]
    # Every step passes here: look in the few added tokens first, since get_vocab() copies the
    # whole vocabulary (49k entries for CLIP, milliseconds a call).
    added = tokenizer.added_tokens_encoder
    if any(t not in added for t in tokens):
        vocab = tokenizer.get_vocab()
        tokenizer.add_tokens([t for t in tokens if t not in vocab])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    bad = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
    if bad:
        raise RuntimeError(f"tokenizer did not register {bad}: they map to its unknown token")
    emb = text_encoder.get_input_embeddings()
    if max(ids, default=-1) >= emb.num_embeddings:
        # Grow only: a model whose matrix is larger than its tokenizer keeps every row.
        text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    return ids


def init_vector(text_encoder, tokenizer, word: str | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A starting vector: the mean embedding of `word`'s tokens, or random with the table's scale."""
    table = text_encoder.get_input_embeddings().weight.detach()
    if word:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init word {word!r} gives no tokens")
        return table[ids].float().mean(0).cpu().clone()
    std = table[: tokenizer.vocab_size].float().std().item()  # the base vocabulary's scale only
    return torch.randn(table.shape[1], generator=generator).float() * std


@dataclass
class ConceptSet:
    """Names, init words and learned vectors of the concepts; a plain value, copied not shared."""

    names: list[str]
    init_words: dict[str, str | None] = field(default_factory=dict)
    vectors: torch.Tensor | None = None  # (K, d), float32

    @classmethod
    def create(cls, bundle, names, init_words=None, seed: int = 0) -> "ConceptSet":
        init_words = dict(init_words or {})
        unknown = set(init_words) - set(names)
        if unknown:
            raise ValueError(f"init: {sorted(unknown)} appear in no prompt; the concepts are {names}")
        gen = torch.Generator().manual_seed(seed)
        vecs = torch.stack([init_vector(bundle.text_encoder, bundle.tokenizer, init_words.get(n), gen) for n in names])
        # The new rows start from their init vectors; learning itself never writes the table
        # (vectors are injected), so every row that existed before stays bit-identical.
        ids = register_tokens(bundle.tokenizer, bundle.text_encoder, names)
        table = bundle.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = vecs.to(table.device, table.dtype)
        return cls(list(names), {n: init_words.get(n) for n in names}, vecs)

    def copy(self) -> "ConceptSet":
        return ConceptSet(list(self.names), dict(self.init_words), self.vectors.detach().clone())

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"concept {name} is not learned here; known concepts: {', '.join(self.names)}")
        return self.names.index(name)

    def token_ids(self, bundle) -> list[int]:
        """The concepts' ids in `bundle`'s tokenizer, registering them first.

        A freshly loaded model (a resumed run, a CLI fine-tune) has not seen the placeholders
        yet; reading ids without registering gave every concept the unknown token's id.
        """
        return register_tokens(bundle.tokenizer, bundle.text_encoder, self.names)


@contextlib.contextmanager
def injected(bundle, concepts: ConceptSet, vectors: torch.Tensor | None = None):
    """Inside the block, the concepts' token ids embed to `vectors` (default: the set's own).

    Pass a tensor that requires grad to optimise it through the text encoder.
    """
    ids = register_tokens(bundle.tokenizer, bundle.text_encoder, concepts.names)
    vectors = concepts.vectors if vectors is None else vectors
    emb = bundle.text_encoder.get_input_embeddings()
    id_tensor = torch.tensor(ids, device=emb.weight.device)

    def hook(module, args, output):
        input_ids = args[0]
        match = input_ids.unsqueeze(-1) == id_tensor  # (B, L, K)
        if not bool(match.any()):
            return output
        vecs = vectors.to(device=output.device, dtype=output.dtype)
        replaced = torch.einsum("blk,kd->bld", match.to(output.dtype), vecs)
        return torch.where(match.any(-1, keepdim=True), replaced, output)

    handle = emb.register_forward_hook(hook)
    try:
        yield ids
    finally:
        handle.remove()


def encode_prompts(bundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and text-encoder hidden states (B, L, D) for prompts written with `[vN]`."""
    tok = bundle.tokenizer
    names = sorted({n for p in prompts for n in concept_names(p)})
    unknown = [n for n in names if placeholder(n) not in tok.added_tokens_encoder]
    if unknown:
        # Unregistered placeholders would be split into sub-words and silently miss the concept.
        raise RuntimeError(f"concepts {unknown} are not registered with the tokenizer; "
                           "encode inside `injected(bundle, concepts)`")
    ids = tok([to_token_text(p) for p in prompts], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(bundle.device)
    hidden = bundle.text_encoder(ids)[0]
    return ids, hidden
