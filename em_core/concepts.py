"""Concept tokens: `[vN]` in prompts, one new tokenizer token and embedding row per concept.

The learned vectors live outside the text encoder and are injected into the embedding
layer's output inside a context, so one loaded model can serve several concept sets and
no existing embedding row ever changes.
"""
from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field

import torch

CONCEPT_RE = re.compile(r"\[v(\d+)\]")


def concept_names(prompt: str) -> list[str]:
    """The concept names in a prompt, in order of first appearance, e.g. ['[v1]', '[v3]']."""
    return list(dict.fromkeys(f"[v{m}]" for m in CONCEPT_RE.findall(prompt)))


def concept_id(tokenizer, name: str) -> int:
    """The id `[vN]` stands for in token ids: len(tokenizer) + N - 1, past every id the tokenizer
    can produce. Computed, never registered: nothing shared (tokenizer, embedding table) changes,
    and a fresh process gets the same ids."""
    return len(tokenizer) + int(CONCEPT_RE.fullmatch(check_name(name)).group(1)) - 1


def check_name(name: str) -> str:
    if not CONCEPT_RE.fullmatch(name):
        raise ValueError(f"concept name {name!r} is not of the form [vN] (e.g. [v1])")
    if name.startswith("[v0"):  # [v0], [v01]: [v01] and [v1] would be two names for one concept
        raise ValueError(f"concept name {name}: concepts are numbered [v1], [v2], ... from 1, with no leading "
                         f"zeros; write [v{int(name[2:-1]) or 1}]")
    return name


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, L) ids of prompts written with `[vN]`, as the tokenizer pads and truncates them
    (start token, text, end token, padding to its max length), each `[vN]` one concept id."""
    length = tokenizer.model_max_length
    rows = []
    for prompt in prompts:
        parts = CONCEPT_RE.split(prompt)  # text, N, text, N, ..., text
        body = []
        for j, part in enumerate(parts):
            if j % 2:
                body.append(concept_id(tokenizer, f"[v{part}]"))
            elif part.strip():
                body += tokenizer(part.strip(), add_special_tokens=False).input_ids
        ids = [tokenizer.bos_token_id] + body[: length - 2] + [tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


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
        for n in names:
            check_name(n)
        vecs = torch.stack([init_vector(bundle.text_encoder, bundle.tokenizer, init_words.get(n), gen) for n in names])
        return cls(list(names), {n: init_words.get(n) for n in names}, vecs)

    def copy(self) -> "ConceptSet":
        return ConceptSet(list(self.names), dict(self.init_words), self.vectors.detach().clone())

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"concept {name} is not learned here; known concepts: {', '.join(self.names)}")
        return self.names.index(name)

    def token_ids(self, bundle) -> list[int]:
        """The concepts' ids in `tokenize`'s output for `bundle`'s tokenizer (computed, so a fresh
        process gets the same ids: reading them from a tokenizer that had not registered the
        placeholders once gave every concept the unknown token's id)."""
        return [concept_id(bundle.tokenizer, n) for n in self.names]


_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # embedding module -> concept ids injected


@contextlib.contextmanager
def injected(bundle, concepts: ConceptSet, vectors: torch.Tensor | None = None):
    """Inside the block, the concepts' ids embed to `vectors` (default: the set's own).

    The ids lie past the embedding table: a pre-hook swaps them for the pad id before the
    lookup and a hook puts the vectors in their place, so the shared table never grows or
    changes. Pass a tensor that requires grad to optimise it through the text encoder.
    """
    ids = concepts.token_ids(bundle)
    vectors = concepts.vectors if vectors is None else vectors
    emb = bundle.text_encoder.get_input_embeddings()
    id_tensor = torch.tensor(ids, device=emb.weight.device)
    pad = bundle.tokenizer.pad_token_id
    pending: list = []

    def pre_hook(module, args):
        input_ids = args[0]
        match = input_ids.unsqueeze(-1) == id_tensor.to(input_ids.device)  # (B, L, K)
        pending.append(match)
        if not bool(match.any()):
            return None
        return (torch.where(match.any(-1), torch.full_like(input_ids, pad), input_ids), *args[1:])

    def hook(module, args, output):
        match = pending.pop()
        if not bool(match.any()):
            return output
        vecs = vectors.to(device=output.device, dtype=output.dtype)
        replaced = torch.einsum("blk,kd->bld", match.to(output.dtype), vecs)
        return torch.where(match.any(-1, keepdim=True), replaced, output)

    handles = [emb.register_forward_pre_hook(pre_hook), emb.register_forward_hook(hook)]
    before = _ACTIVE.get(emb, frozenset())
    _ACTIVE[emb] = before | set(ids)
    try:
        yield ids
    finally:
        for h in handles:
            h.remove()
        _ACTIVE[emb] = before


def encode_prompts(bundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and text-encoder hidden states (B, L, D) for prompts written with `[vN]`.

    A prompt naming a concept must be encoded inside `injected` for it: its id has no row.
    """
    tok = bundle.tokenizer
    emb = bundle.text_encoder.get_input_embeddings()
    active = _ACTIVE.get(emb, frozenset())
    missing = sorted({n for p in prompts for n in concept_names(p) if concept_id(tok, n) not in active})
    if missing:
        raise RuntimeError(f"concepts {missing} are not injected; encode inside `injected(bundle, concepts)`")
    ids = tokenize(tok, prompts).to(bundle.device)
    hidden = bundle.text_encoder(ids)[0]
    return ids, hidden
