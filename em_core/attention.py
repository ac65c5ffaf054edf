"""Capture of concept-token cross-attention maps inside the U-Net.

Chosen cross-attention layers get a processor that computes the softmax explicitly and
keeps only the concept columns, averaged over heads and summed over layers; every other
layer keeps the processor it had (fused `AttnProcessor2_0` by default). Maps keep their autograd graph so the
attention loss can flow back into the token vectors.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

LAYERS_COARSE = "coarse"  # down/up cross-attention at the coarsest resolution they have (Break-A-Scene)
LAYERS_ALL = "all"  # every cross-attention layer, each resized to a common size
_NAME_RE = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\..*attn2\.processor$")


def layer_downsample(name: str, n_blocks: int) -> int:
    """How much coarser than the latent a layer's feature map is, from its name and the U-Net depth."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"{name} is not a cross-attention processor name")
    kind, idx = m.group(1), m.group(2)
    if kind == "down_blocks":
        return 2 ** int(idx)
    if kind == "up_blocks":
        return 2 ** (n_blocks - 1 - int(idx))
    return 2 ** (n_blocks - 1)


def select_layers(unet, mode: str = LAYERS_COARSE) -> dict[str, int]:
    """Cross-attention processor names to capture, with their downsample factor."""
    n_blocks = len(unet.config.block_out_channels)
    cross = {n: layer_downsample(n, n_blocks) for n in unet.attn_processors if n.endswith("attn2.processor")}
    if not cross:
        raise ValueError("this U-Net has no cross-attention layers to read concept maps from")
    if mode == LAYERS_ALL:
        return cross
    if mode != LAYERS_COARSE:
        raise ValueError(f"attention layers: unknown mode {mode!r}; use {LAYERS_COARSE!r} or {LAYERS_ALL!r}")
    updown = {n: f for n, f in cross.items() if not n.startswith("mid_block")} or cross
    coarsest = max(updown.values())
    return {n: f for n, f in updown.items() if f == coarsest}


class MapsComplete(Exception):
    """Raised by the last captured layer of a maps-only U-Net call: the rest of the U-Net is skipped."""


def selected_maps(probs: torch.Tensor, select: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w): the attention each pixel gives the text positions `select` (B, L, K) picks,
    from one layer's softmax `probs` (B, heads, h*w, L), averaged over heads."""
    maps = torch.einsum("bhnl,blk->bkn", probs, select.to(probs.dtype)) / probs.shape[1]
    return maps.reshape(maps.shape[0], maps.shape[1], *hw)


class MapStore:
    """Accumulates per-concept maps for one U-Net call.

    `select` is (B, L, K): which text positions belong to which concept in each batch item.
    With `stop_early`, the layer that completes the set raises MapsComplete.
    """

    def __init__(self, layers: dict[str, int], latent_hw: tuple[int, int], select: torch.Tensor,
                 stop_early: bool = False):
        self.stop_early = stop_early
        self.layers = layers
        self.latent_hw = latent_hw
        self.select = select
        finest = min(layers.values())
        self.out_hw = (latent_hw[0] // finest, latent_hw[1] // finest)
        self.total: torch.Tensor | None = None
        self.count = 0
        self.closed = False  # after its U-Net call: still computes (for checkpoint replays), keeps nothing

    def add(self, name: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, N, L) softmax attention of one layer."""
        factor = self.layers[name]
        h, w = self.latent_hw[0] // factor, self.latent_hw[1] // factor
        if h * w != probs.shape[2]:  # the layer's map is not the size its place in the U-Net gives
            raise ValueError(f"attention layer {name}: {probs.shape[2]} positions, but a {self.latent_hw[0]}x"
                             f"{self.latent_hw[1]} latent downsampled {factor}x gives {h}x{w}; the latent sides "
                             "must divide by the U-Net's downsampling")
        maps = selected_maps(probs, self.select, (h, w))
        if (h, w) != self.out_hw:
            maps = F.interpolate(maps, size=self.out_hw, mode="bilinear", align_corners=False)
        if self.closed:
            return
        self.total = maps if self.total is None else self.total + maps
        self.count += 1
        if self.stop_early and self.count == len(self.layers):
            raise MapsComplete

    def maps(self) -> torch.Tensor:
        """(B, K, h, w): the concept maps averaged over the captured layers."""
        if self.total is None:
            raise RuntimeError("no cross-attention layer ran while capturing; was the U-Net called?")
        return self.total / self.count


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a torch with no autocast for this device: then nothing is cast either
        return contextlib.nullcontext()


class CaptureProcessor:
    """Cross-attention with an explicit softmax whose concept columns go to a MapStore.

    Installed only inside an AttentionCapture block; `original` serves self-attention.

    Its body follows diffusers' AttnProcessor rather than wrapping it: a wrapper that hooks
    `get_attention_scores` (tried in issue 18) gives the same outputs and maps bit for bit, but its
    gradients differ in the last bits (up to 4e-11 in float32 on the tiny U-Nets, where this body
    is deterministic), because AttnProcessor folds the heads into the batch before the matmuls.
    """

    def __init__(self, name: str, slot: list, original=None):
        self.name = name
        self.slot = slot  # one-element list holding the active MapStore (or None)
        self.original = original or AttnProcessor2_0()  # used whenever no capture is running

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        store = self.slot[0]
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Scores and softmax in float32: fp16 scores overflow (why SD 2.x sets upcast_attention).
        # Autocast is held off here, or it would run the float32 matmul in half precision anyway.
        with _autocast_off(query.device.type):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
            probs = scores.softmax(dim=-1)
        # The same ops run whether or not a capture is live, so gradient checkpointing's
        # replay of this layer during backward matches its first pass.
        if store is not None:
            store.add(self.name, probs)
        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Installs capture processors on chosen layers for the life of a `with` block.

    Usage: `with AttentionCapture(unet) as cap: maps = cap.run(select, latent_hw, lambda: unet(...))`.
    The U-Net's own processors are put back on exit. `stop_early`: the calls are for maps only;
    each ends after the last captured layer and `run` returns None for the U-Net's output.
    """

    def __init__(self, unet, mode: str = LAYERS_COARSE, stop_early: bool = False):
        self.unet = unet
        self.stop_early = stop_early
        self.layers = select_layers(unet, mode)
        self.slot: list = [None]
        self._saved = None

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        # Layers not captured keep whatever processor the U-Net had (fused by default).
        procs = {n: (CaptureProcessor(n, self.slot, p) if n in self.layers else p) for n, p in self._saved.items()}
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self._saved)
        self.slot[0] = None

    def run(self, select: torch.Tensor, latent_hw: tuple[int, int], call):
        """Runs `call()` (a U-Net forward) capturing maps; returns (call's result, maps (B, K, h, w))."""
        store = MapStore(self.layers, latent_hw, select, self.stop_early)
        self.slot[0] = store
        out = None
        try:
            out = call()
        except MapsComplete:
            pass
        finally:
            store.closed = True  # stays in the slot for checkpoint replays until the next run
        return out, store.maps()


def concept_selector(input_ids: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """(B, L, K) float: 1 where text position l of item b is concept k's token."""
    ids = torch.tensor(token_ids, device=input_ids.device)
    return (input_ids.unsqueeze(-1) == ids).float()
