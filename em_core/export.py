"""Export for ordinary ComfyUI graphs: a textual-inversion embedding per concept and a LoRA.

Embeddings: one safetensors file per concept holding a (1, dim) tensor under the key ComfyUI's
embedding loader looks for ('clip_l' for SD 1.x, 'clip_h' for SD 2.x) and under 'emb_params'
(A1111); use it as `embedding:NAME` in a core CLIP Text Encode. On SDXL the one file holds the
concept's two rows, 'clip_l' (CLIP ViT-L) and 'clip_g' (OpenCLIP ViT-bigG), as ComfyUI's SDXL
tokenizers look them up.

LoRA: kohya / A1111 key names, which ComfyUI's core LoRA loader maps for SD 1.x / 2.x:
`lora_unet_<diffusers module path, dots as underscores>` and
`lora_te_text_model_encoder_layers_N_<self_attn_q_proj | ... | mlp_fc1>`, each with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` (ComfyUI scales by alpha / rank). SDXL:
the same U-Net form, and `lora_te1_` / `lora_te2_` for its two text encoders (and
`lora_te2_text_projection`), as comfy/lora.py maps them for SDXL.
A full fine-tune's delta is reduced to a LoRA of the chosen rank per Linear / Conv2d weight.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import torch

from .atomic import inside, prepare_out, write_atomic

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The text-encoder layers ComfyUI's CLIP LoRA map covers (comfy/lora.py, LORA_CLIP_MAP).
TE_LORA_RE = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_deterministic(tensors: dict, path, metadata: dict | None = None) -> None:
    """A safetensors file whose bytes depend on its contents alone: safetensors' own save_file
    writes the metadata in a random order (a Rust HashMap), so two exports of one concept file
    differed.
    Tensors in name order, the header's keys sorted, the header padded to 8 bytes as the format asks."""
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def check_export_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise ValueError(f"export name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
                         "no path separators and no '..'")
    return name


SDXL_WIDTHS = (768, 1280)  # CLIP ViT-L and OpenCLIP ViT-bigG token widths


def embedding_key(dim: int) -> str:
    return "clip_h" if dim == 1024 else "clip_l"


# Not diffusers' convert_state_dict_to_kohya (diffusers.utils): it names the text encoder's layers
# lora_te1_... (SDXL's first encoder) for every model, which ComfyUI's key map for SD 1.x / 2.x
# (recorded in tests/data/comfyui_lora_keys_sd*.json) does not list, and writes alpha as the rank, not
# the adapter's own alpha (issue 18). Its U-Net names are the same as these; lora_te1_ is used here
# for SDXL only (`xl`).
def kohya_name(component: str, module: str, xl: bool = False) -> str:
    """The kohya name of a module; `xl`: the model is SDXL (its first text encoder is `lora_te1_`)."""
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    if component == "text_encoder_2" and module == "text_projection":
        return "lora_te2_text_projection"
    if not module.startswith("text_model."):  # transformers 5 drops the text_model level
        module = "text_model." + module
    prefix = {"text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + module.replace(".", "_")


def _exportable(component: str, module: str) -> bool:
    if component == "text_encoder_2" and module == "text_projection":
        return True
    return component == "unet" or bool(TE_LORA_RE.match(module))


def _is_xl(weights, xl: bool | None) -> bool:
    """SDXL weights: as told, else when a second text encoder is among them."""
    return "text_encoder_2" in weights.components() if xl is None else bool(xl)


def lora_from_peft(weights, xl: bool | None = None) -> tuple[dict, list[str]]:
    """kohya tensors from a peft adapter's lora_A / lora_B pairs."""
    out, skipped, xl = {}, [], _is_xl(weights, xl)
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
        name = kohya_name(component, module, xl)
        out[f"{name}.lora_down.weight"] = down.float().contiguous()
        out[f"{name}.lora_up.weight"] = up.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out, skipped


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: {rank!r}; a LoRA's rank is a whole number of at least 1")
    return rank


def svd_lowrank(mat: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank's randomised SVD (Halko et al., subspace iterations), its random test
    matrix drawn from a generator of its own: the same matrix gives the same factors, and the
    global random state is neither read nor advanced (torch.svd_lowrank uses and moves it)."""
    transpose = mat.shape[0] < mat.shape[1]
    a = mat.mT if transpose else mat  # (m, n), m >= n
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    u, v = basis @ u_small, vh.mT
    return (v, s, u) if transpose else (u, s, v)


def lora_from_delta(weights, rank: int, xl: bool | None = None) -> tuple[dict, list[str]]:
    """A rank-`rank` LoRA per Linear / Conv2d weight delta (randomised SVD, seeded per weight from
    its name, so an export is the same bytes every time); others are listed as skipped."""
    check_rank(rank)
    out, skipped, xl = {}, [], _is_xl(weights, xl)
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
        u, s, v = svd_lowrank(mat, q=min(r + 8, *mat.shape), niter=4, seed=zlib.crc32(key.encode()))
        up = (u[:, :r] * s[:r]).contiguous()
        down = v[:, :r].T.contiguous()
        if d.ndim == 4:
            down = down.reshape(r, d.shape[1], d.shape[2], d.shape[3])
            up = up.reshape(d.shape[0], r, 1, 1)
        name = kohya_name(component, module, xl)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(r))  # alpha / rank = 1: the product is the delta
    return out, skipped


def embedding_name(name: str, concept: str) -> str:
    """The file stem of a concept's embedding, used as `embedding:<stem>` in ComfyUI prompts."""
    return f"{name}_{concept[1:-1]}"


def export_embeddings(concepts, folder: str | Path, name: str, widths=None) -> list[Path]:
    """FOLDER/NAME_vN.safetensors, one per concept of a ConceptSet. `widths`: the text encoders'
    token widths for an SDXL set ((768, 1280) on SDXL base), whose vectors are both rows end to end."""
    check_export_name(name)
    root = prepare_out(folder)
    vectors = concepts.vectors.float()
    if widths is None and vectors.shape[1] == SDXL_WIDTHS[0] + SDXL_WIDTHS[1]:
        widths = SDXL_WIDTHS  # SDXL base's two rows; no single SD text encoder is 2048 wide
    if widths is not None and len(widths) == 2:
        if sum(widths) != vectors.shape[1]:
            raise ValueError(f"embeddings: vectors {vectors.shape[1]} wide are not two rows of {widths[0]} + {widths[1]}")
    elif widths is not None and len(widths) != 1:
        raise ValueError(f"embeddings: {len(widths)} text encoders; one (SD 1.x / 2.x) or two (SDXL) are known")
    written = []
    for concept, vec in zip(concepts.names, vectors):
        file = inside(root, f"{embedding_name(name, concept)}.safetensors")
        if widths is not None and len(widths) == 2:
            tensors = {"clip_l": vec[None, :widths[0]].clone().contiguous(),
                       "clip_g": vec[None, widths[0]:].clone().contiguous()}
        else:
            tensors = {embedding_key(vectors.shape[1]): vec[None].clone().contiguous(),
                       "emb_params": vec[None].clone().contiguous()}
        meta = {"concept": concept, "init_word": str(concepts.init_words.get(concept))}
        write_atomic(file, lambda tmp, t=tensors, m=meta: save_deterministic(t, tmp, metadata=m))
        written.append(file)
    return written


def lora_state_dict(weights, rank: int = 16, xl: bool | None = None) -> tuple[dict, list[str]]:
    return lora_from_peft(weights, xl) if weights.kind == "lora" else lora_from_delta(weights, rank, xl)


def export_lora(weights, folder: str | Path, name: str, rank: int = 16, concept_names=(),
                xl: bool | None = None) -> tuple[Path, list]:
    """FOLDER/NAME.safetensors in kohya keys; returns it and the weights that have no LoRA form."""
    check_export_name(name)
    check_rank(rank)
    tensors, skipped = lora_state_dict(weights, rank, xl)
    file = inside(prepare_out(folder), f"{name}.safetensors")
    meta = {"em_core.kind": weights.kind, "em_core.rank": str(weights.rank if weights.kind == "lora" else rank),
            "concepts": ",".join(concept_names)}
    write_atomic(file, lambda tmp: save_deterministic(tensors, tmp, metadata=meta))
    return file, skipped


def export_concepts(concept_file, out: str | Path, name: str, rank: int = 16) -> dict:
    """Writes OUT/embeddings/NAME_vN.safetensors and, if there are weights, OUT/loras/NAME.safetensors."""
    check_export_name(name)
    check_rank(rank)  # before anything is written: no embeddings without their LoRA
    root = prepare_out(out)
    base = concept_file.meta.get("base_model") or {}
    xl = base.get("family") == "sdxl"
    widths = base.get("text_dims") if xl else None
    written = {"embeddings": export_embeddings(concept_file.concepts, inside(root, "embeddings"), name, widths),
               "lora": None, "skipped": []}
    if concept_file.weights is not None:
        written["lora"], written["skipped"] = export_lora(concept_file.weights, inside(root, "loras"), name, rank,
                                                          concept_file.names, xl=xl)
    return written
