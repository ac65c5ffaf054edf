"""Diffusers <-> original LDM (A1111 / ComfyUI checkpoint) names for SD 1.x / 2.x / XL weights.

diffusers converts LDM checkpoints to its own layout (loaders.single_file_utils); this is the
other direction, written from the two layouts' structure. It lets the engine write a
checkpoint ComfyUI's Load Checkpoint reads, and lets tests build LDM-layout files from
random diffusers models and round-trip them.
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
XL_CLIP_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_block_map(config) -> dict[str, str]:
    """Diffusers module prefixes -> LDM module prefixes for a UNet2DConditionModel config."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if "CrossAttn" in down[i]:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        for j in range(per + 1):
            k = i * (per + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if "CrossAttn" in up[i]:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            slot = 2 if "CrossAttn" in up[i] else 1
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per + 1) + per}.{slot}.conv"
    return m


def _rename(key: str, blocks: dict, inner: dict) -> str:
    for prefix in sorted(blocks, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            rest = key[len(prefix):]
            if ".resnets." in prefix + "." or prefix.startswith(("mid_block.resnets", "encoder.mid_block.resnets",
                                                                 "decoder.mid_block.resnets")):
                for a, b in inner.items():
                    if rest.startswith("." + a + "."):
                        rest = "." + b + rest[len(a) + 1:]
                        break
            return blocks[prefix] + rest
    return key


def unet_to_ldm(state: dict, config) -> dict:
    blocks = unet_block_map(config)
    return {UNET_PREFIX + _rename(k, blocks, _UNET_RESNET): v for k, v in state.items()}


def vae_block_map(config) -> dict[str, str]:
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        m[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        for j in range(per):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(per + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return m


def vae_to_ldm(state: dict, config) -> dict:
    blocks = vae_block_map(config)
    out = {}
    for k, v in state.items():
        name = _rename(k, blocks, {"conv_shortcut": "nin_shortcut"})
        if ".mid.attn_1." in name:
            for a, b in _VAE_ATTN.items():
                name = name.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if v.ndim == 2:  # LDM keeps the VAE's attention projections as 1x1 convolutions
                v = v[:, :, None, None]
        out[VAE_PREFIX + name] = v
    return out


def clip_to_ldm(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """SD 1.x's CLIP-L: HF names under cond_stage_model.transformer.text_model. (SDXL's: under `prefix`)."""
    out = {}
    for k, v in state.items():
        name = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + name] = v
    return out


def openclip_to_ldm(state: dict, prefix: str = XL_CLIP_PREFIXES[1]) -> dict:
    """SDXL's OpenCLIP ViT-bigG in its original names: q/k/v in one in_proj, the projection as a
    (width, projection) matrix."""
    out, qkv = {}, {}
    for k, v in state.items():
        name = k[len("text_model."):] if k.startswith("text_model.") else k
        if name == "embeddings.position_ids":
            continue
        if name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name.rsplit(".", 1)[1]] = v
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif name.startswith("encoder.layers."):
            _, _, n, rest = name.split(".", 3)
            block = f"{prefix}transformer.resblocks.{n}."
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[module[-6]] = v
            else:
                out[block + _OPENCLIP[module] + "." + kind] = v
        else:
            raise KeyError(f"OpenCLIP layout: no original name for {k}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def bundle_to_ldm(bundle) -> dict[str, torch.Tensor]:
    """One SD 1.x checkpoint state dict (U-Net, VAE, CLIP-L) in the original layout; SDXL's with both
    text encoders under conditioner.embedders."""
    sd = unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config)
    sd.update(vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config))
    if bundle.is_xl:
        sd.update(clip_to_ldm(bundle.text_encoders[0].state_dict(), XL_CLIP_PREFIXES[0]))
        sd.update(openclip_to_ldm(bundle.text_encoders[1].state_dict()))
    else:
        sd.update(clip_to_ldm(bundle.text_encoder.state_dict()))
    return {k: v.detach().contiguous() for k, v in sd.items()}
