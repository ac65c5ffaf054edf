"""Concept tokens: `[vN]` in prompts, one new tokenizer token and embedding row per concept.

The learned vectors live outside the text encoder and are injected into the embedding
layer's output inside a context, so one loaded model can serve several concept sets and
no existing embedding row ever changes. On SDXL each concept is a token in both text encoders:
its vector is the two encoders' rows end to end (768 + 1280 wide on SDXL base), split on injection.
"""
from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Optional

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
        vecs = torch.stack([torch.cat([init_vector(te, tok, init_words.get(n), gen)
                                       for te, tok in zip(bundle.text_encoders, bundle.tokenizers)]) for n in names])
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


def embedding_widths(bundle) -> list[int]:
    """Each text encoder's token width; a concept vector is these end to end."""
    return [int(te.get_input_embeddings().weight.shape[1]) for te in bundle.text_encoders]


@contextlib.contextmanager
def injected(bundle, concepts: ConceptSet, vectors: torch.Tensor | None = None):
    """Inside the block, the concepts' ids embed to `vectors` (default: the set's own).

    The ids lie past the embedding table: a pre-hook swaps them for the pad id before the
    lookup and a hook puts the vectors in their place, so the shared table never grows or
    changes. Pass a tensor that requires grad to optimise it through the text encoder.
    With two text encoders (SDXL) each gets its own slice of the vectors.
    """
    vectors = concepts.vectors if vectors is None else vectors
    widths = embedding_widths(bundle)
    if vectors.shape[-1] != sum(widths):
        raise ValueError(f"concept vectors are {vectors.shape[-1]} wide, but this model's text encoder(s) embed "
                         f"tokens in {' + '.join(map(str, widths))}; they were learned on another kind of model")
    with contextlib.ExitStack() as stack:
        ids, start = None, 0
        for te, tok, width in zip(bundle.text_encoders, bundle.tokenizers, widths):
            own = stack.enter_context(_injected_one(te, tok, concepts, vectors[..., start:start + width]))
            ids = own if ids is None else ids
            start += width
        yield ids


@contextlib.contextmanager
def _injected_one(text_encoder, tokenizer, concepts: ConceptSet, vectors: torch.Tensor):
    ids = [concept_id(tokenizer, n) for n in concepts.names]
    emb = text_encoder.get_input_embeddings()
    id_tensor = torch.tensor(ids, device=emb.weight.device)
    pad = tokenizer.pad_token_id
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


@dataclass
class TextCond:
    """A batch of encoded prompts: token ids (B, L) of the first tokenizer (where concept positions
    are read), the U-Net's cross-attention input (B, L, D) and, on SDXL, the pooled text (B, P)."""

    ids: torch.Tensor
    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def detached(self) -> "TextCond":
        return TextCond(self.ids, self.hidden.detach(), None if self.pooled is None else self.pooled.detach())


def _check_injected(bundle, prompts: list[str]) -> None:
    names = sorted({n for p in prompts for n in concept_names(p)})
    for te, tok in zip(bundle.text_encoders, bundle.tokenizers):
        active = _ACTIVE.get(te.get_input_embeddings(), frozenset())
        missing = [n for n in names if concept_id(tok, n) not in active]
        if missing:
            raise RuntimeError(f"concepts {missing} are not injected; encode inside `injected(bundle, concepts)`")


def encode_text(bundle, prompts: list[str]) -> TextCond:
    """Encodes prompts written with `[vN]` as the model's U-Net reads them. SD 1.x / 2.x: the text
    encoder's last hidden states. SDXL: both encoders' penultimate hidden states end to end, and the
    second encoder's projected hidden state at the end token as the pooled text (found from the ids,
    not by the encoder's own argmax, which would land on a concept id past the vocabulary).

    A prompt naming a concept must be encoded inside `injected` for it: its id has no row.
    """
    _check_injected(bundle, prompts)
    if not bundle.is_xl:
        ids = tokenize(bundle.tokenizer, prompts).to(bundle.device)
        return TextCond(ids, bundle.text_encoder(ids)[0])
    hidden, first, pooled = [], None, None
    for j, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
        ids = tokenize(tok, prompts).to(bundle.device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if j == 0:
            first = ids
        else:
            end = (ids == tok.eos_token_id).int().argmax(-1)
            last = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), end]
            pooled = te.text_projection(last)
    return TextCond(first, torch.cat(hidden, dim=-1), pooled)


def encode_prompts(bundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and the U-Net's cross-attention input (B, L, D) for prompts written with
    `[vN]` (encode_text without SDXL's pooled text)."""
    cond = encode_text(bundle, prompts)
    return cond.ids, cond.hidden


def time_ids(original_hw, target_hw, crop=(0, 0)) -> torch.Tensor:
    """SDXL's six size conditions: original (h, w), crop top-left (y, x), target (h, w), in pixels."""
    return torch.tensor([[*original_hw, *crop, *target_hw]], dtype=torch.float32)


def unet_inputs(bundle, cond: TextCond, batch: int, target_hw=None, original_hw=None,
                dtype: torch.dtype | None = None) -> dict:
    """The U-Net's keyword arguments for `batch` noisy latents conditioned on `cond` (one prompt, or
    `batch` prompts): encoder_hidden_states, and on SDXL added_cond_kwargs (the pooled text and the
    time ids from the image's original size in pixels, crop (0, 0) and the target size)."""
    dtype = dtype or bundle.dtype
    hidden = cond.hidden.to(dtype)
    if hidden.shape[0] != batch:
        hidden = hidden.expand(batch, -1, -1)
    kw = {"encoder_hidden_states": hidden}
    if bundle.is_xl:
        if target_hw is None:
            raise ValueError("an SDXL U-Net call needs the target size for its time ids")
        pooled = cond.pooled.to(dtype)
        if pooled.shape[0] != batch:
            pooled = pooled.expand(batch, -1)
        ids = time_ids(tuple(original_hw or target_hw), tuple(target_hw)).to(cond.hidden.device, dtype)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.expand(batch, -1)}
    return kw


def image_sizes(bundle, image) -> dict:
    """A training image's target (h, w) (its working size) and original (h, w) (its file's), in pixels."""
    h, w = image.latent_hw
    f = bundle.vae_scale_factor
    ow, oh = image.original_size
    return {"target_hw": (h * f, w * f), "original_hw": (oh, ow)}
