import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from em_core.attention import AttentionCapture, CaptureProcessor, concept_selector, select_layers
from em_core.concepts import ConceptSet, encode_prompts, injected
from em_core.tiny_world.tiny_model import SD15


def _sd15_unet_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15["unet"])


def test_coarse_layers_of_sd15_are_the_16px_down_and_up_layers():
    layers = select_layers(_sd15_unet_meta(), "coarse")
    assert sorted(layers) == sorted(
        [f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(2)]
        + [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(3)])
    assert set(layers.values()) == {4}  # 64 px latent / 4 = 16 px maps at 512 px
    assert len(select_layers(_sd15_unet_meta(), "all")) == 16
    with pytest.raises(ValueError, match="unknown mode"):
        select_layers(_sd15_unet_meta(), "middle")


def _inputs(bundle, prompt="a photo of [v1] and [v2]"):
    cs = ConceptSet.create(bundle, ["[v1]", "[v2]"], {"[v1]": "dog"})
    with injected(bundle, cs):
        ids, hidden = encode_prompts(bundle, [prompt, prompt])
    latents = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(0))  # non-square on purpose
    return cs, ids, hidden, latents


@pytest.mark.parametrize("mode", ["coarse", "all"])
def test_capture_keeps_the_output_and_returns_concept_maps(bundle, mode):
    cs, ids, hidden, latents = _inputs(bundle)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = bundle.unet(latents, t, encoder_hidden_states=hidden).sample
        with AttentionCapture(bundle.unet, mode) as cap:
            kinds = {type(p) for n, p in bundle.unet.attn_processors.items() if n not in cap.layers}
            assert kinds == {AttnProcessor2_0}  # layers not captured stay on the fused path
            sel = concept_selector(ids, cs.token_ids(bundle))
            out, maps = cap.run(sel, (16, 8), lambda: bundle.unet(latents, t, encoder_hidden_states=hidden).sample)
    assert torch.allclose(out, ref, atol=1e-5)
    finest = min(cap.layers.values())
    assert maps.shape == (2, 2, 16 // finest, 8 // finest)
    assert (maps >= 0).all() and (maps <= 1).all() and maps.sum() > 0
    # The U-Net's own processors are back.
    assert not any(isinstance(p, CaptureProcessor) for p in bundle.unet.attn_processors.values())


def test_coarse_mode_on_tiny_model_uses_the_coarsest_layers(bundle):
    layers = select_layers(bundle.unet, "coarse")
    assert set(layers.values()) == {2}
    assert all(not n.startswith("mid_block") for n in layers)


def test_maps_carry_gradients_to_the_token_vectors(bundle):
    cs, _, _, latents = _inputs(bundle)
    vec = torch.nn.Parameter(cs.vectors.clone())
    with injected(bundle, cs, vec):
        ids, hidden = encode_prompts(bundle, ["a photo of [v1] and [v2]"])
    sel = concept_selector(ids, cs.token_ids(bundle))
    with AttentionCapture(bundle.unet) as cap:
        _, maps = cap.run(sel, (16, 8), lambda: bundle.unet(latents[:1], torch.tensor([100]),
                                                            encoder_hidden_states=hidden).sample)
    maps[:, 0].sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0


def test_absent_concept_gives_a_zero_map(bundle):
    cs, _, _, latents = _inputs(bundle)
    with injected(bundle, cs):
        ids, hidden = encode_prompts(bundle, ["a photo of [v1]"])
    sel = concept_selector(ids, cs.token_ids(bundle))
    with torch.no_grad(), AttentionCapture(bundle.unet) as cap:
        _, maps = cap.run(sel, (16, 8), lambda: bundle.unet(latents[:1], torch.tensor([100]),
                                                            encoder_hidden_states=hidden).sample)
    assert maps[0, 0].sum() > 0 and maps[0, 1].abs().sum() == 0


def test_stop_early_gives_the_same_maps_and_skips_the_rest_of_the_unet(bundle):
    cs, ids, hidden, latents = _inputs(bundle)
    t = torch.tensor([10, 500])
    sel = concept_selector(ids, cs.token_ids(bundle))
    calls = []
    hook = bundle.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            with AttentionCapture(bundle.unet) as cap:
                out, full = cap.run(sel, (16, 8), lambda: bundle.unet(latents, t, encoder_hidden_states=hidden).sample)
            assert out is not None and len(calls) == 1
            with AttentionCapture(bundle.unet, stop_early=True) as cap:
                out, early = cap.run(sel, (16, 8), lambda: bundle.unet(latents, t, encoder_hidden_states=hidden).sample)
    finally:
        hook.remove()
    assert out is None and len(calls) == 1  # the second call never reached the output convolution
    assert torch.equal(full, early)


def test_captured_scores_stay_float32_under_autocast():
    """Mixed precision must not round the captured scores to half precision (fp16 ones overflow)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=1, dim_head=16)
    x, text = torch.randn(1, 64, 16) * 4, torch.randn(1, 7, 16) * 4  # scores of several units: rounding shows

    class Keep:
        probs = []

        def add(self, name, probs):
            self.probs.append(probs)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        CaptureProcessor("layer", [Keep()])(attn, x, text)
        q, k = attn.to_q(x), attn.to_k(text)  # the projections autocast makes half, as the processor saw them
    got = Keep.probs[0][0, 0]
    want = ((q[0].float() @ k[0].float().T) * attn.scale).softmax(-1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
