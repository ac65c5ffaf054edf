"""Export for ordinary ComfyUI graphs: a textual-inversion embedding per concept and a LoRA.

Embeddings: one safetensors file per concept holding a (1, dim) tensor under the key ComfyUI's
embedding loader looks for ('clip_l' for SD 1.x, 'clip_h' for SD 2.x) and under 'emb_params'
(A1111); use it as `embedding:NAME` in a core CLIP Text Encode.

LoRA: kohya / A1111 key names, which ComfyUI's core LoRA loader maps for SD 1.x / 2.x:
`lora_unet_<diffusers module path, dots as underscores>` and
`lora_te_text_model_encoder_layers_N_<self_attn_q_proj | ... | mlp_fc1>`, each with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` (ComfyUI scales by alpha / rank).
A full fine-tune's delta is reduced to a LoRA of the chosen rank per Linear / Conv2d weight.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import inside, prepare_out, write_atomic

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The text-encoder layers ComfyUI's CLIP LoRA map covers (comfy/lora.py, LORA_CLIP_MAP).
TE_LORA_RE = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def check_export_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise ValueError(f"export name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
                         "no path separators and no '..'")
    return name


def embedding_key(dim: int) -> str:
    return "clip_h" if dim == 1024 else "clip_l"


def kohya_name(component: str, module: str) -> str:
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    if not module.startswith("text_model."):  # transformers 5 drops the text_model level
        module = "text_model." + module
    return "lora_te_" + module.replace(".", "_")


def _exportable(component: str, module: str) -> bool:
    return component == "unet" or bool(TE_LORA_RE.match(module))


def lora_from_peft(weights) -> tuple[dict, list[str]]:
    """kohya tensors from a peft adapter's lora_A / lora_B pairs."""
    out, skipped = {}, []
    alpha = float(weights.alpha if weights.alpha is not None else weights.rank)
    for key, down in weights.tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        component, rest = key.split(".", 1)
        module = rest[: -len(".lora_A.weight")]
        if not _exportable(component, module):
            skipped.append(key)
            continue
        up = weights.tensors[f"{component}.{module}.lora_B.weight"]
        name = kohya_name(component, module)
        out[f"{name}.lora_down.weight"] = down.float().contiguous()
        out[f"{name}.lora_up.weight"] = up.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out, skipped


def lora_from_delta(weights, rank: int) -> tuple[dict, list[str]]:
    """A rank-`rank` LoRA per Linear / Conv2d weight delta (randomised SVD); others are listed as skipped."""
    out, skipped = {}, []
    for key, delta in weights.tensors.items():
        component, param = key.split(".", 1)
        if not param.endswith(".weight") or delta.ndim not in (2, 4):
            skipped.append(key)
            continue
        module = param[: -len(".weight")]
        if not _exportable(component, module):
            skipped.append(key)
            continue
        d = delta.float()
        mat = d.reshape(d.shape[0], -1)
        r = min(rank, *mat.shape)
        u, s, v = torch.svd_lowrank(mat, q=min(r + 8, *mat.shape), niter=4)
        up = (u[:, :r] * s[:r]).contiguous()
        down = v[:, :r].T.contiguous()
        if d.ndim == 4:
            down = down.reshape(r, d.shape[1], d.shape[2], d.shape[3])
            up = up.reshape(d.shape[0], r, 1, 1)
        name = kohya_name(component, module)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(r))  # alpha / rank = 1: the product is the delta
    return out, skipped


def embedding_name(name: str, concept: str) -> str:
    """The file stem of a concept's embedding, used as `embedding:<stem>` in ComfyUI prompts."""
    return f"{name}_{concept[1:-1]}"


def export_embeddings(concepts, folder: str | Path, name: str) -> list[Path]:
    """FOLDER/NAME_vN.safetensors, one per concept of a ConceptSet."""
    check_export_name(name)
    root = prepare_out(folder)
    vectors = concepts.vectors.float()
    key = embedding_key(vectors.shape[1])
    written = []
    for concept, vec in zip(concepts.names, vectors):
        file = inside(root, f"{embedding_name(name, concept)}.safetensors")
        tensors = {key: vec[None].clone().contiguous(), "emb_params": vec[None].clone().contiguous()}
        meta = {"concept": concept, "init_word": str(concepts.init_words.get(concept))}
        write_atomic(file, lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
        written.append(file)
    return written


def lora_state_dict(weights, rank: int = 16) -> tuple[dict, list[str]]:
    return lora_from_peft(weights) if weights.kind == "lora" else lora_from_delta(weights, rank)


def export_lora(weights, folder: str | Path, name: str, rank: int = 16, concept_names=()) -> tuple[Path, list]:
    """FOLDER/NAME.safetensors in kohya keys; returns it and the weights that have no LoRA form."""
    check_export_name(name)
    tensors, skipped = lora_state_dict(weights, rank)
    file = inside(prepare_out(folder), f"{name}.safetensors")
    meta = {"em_core.kind": weights.kind, "em_core.rank": str(weights.rank if weights.kind == "lora" else rank),
            "concepts": ",".join(concept_names)}
    write_atomic(file, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return file, skipped


def export_concepts(concept_bundle, out: str | Path, name: str, rank: int = 16) -> dict:
    """Writes OUT/embeddings/NAME_vN.safetensors and, if there are weights, OUT/loras/NAME.safetensors."""
    check_export_name(name)
    root = prepare_out(out)
    written = {"embeddings": export_embeddings(concept_bundle.concepts, inside(root, "embeddings"), name),
               "lora": None, "skipped": []}
    if concept_bundle.weights is not None:
        written["lora"], written["skipped"] = export_lora(concept_bundle.weights, inside(root, "loras"), name, rank,
                                                          concept_bundle.names)
    return written
