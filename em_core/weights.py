"""Fine-tuned weights kept beside the base model, applied only inside a context.

Two kinds: a full-weight delta (trained minus base, per parameter) and a LoRA adapter made
with peft. Inside `applied(...)` the base modules see the tuned weights; on exit they get
their own Parameter objects (full) or their own layers (LoRA) back, bit for bit, so one
loaded model can serve several concept sets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

LORA_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "text_encoder_2": ["q_proj", "k_proj", "v_proj", "out_proj"],  # SDXL's second (OpenCLIP bigG)
}
ADAPTER = "em_core"


@dataclass
class TunedWeights:
    """`tensors` keys are '<component>.<parameter or peft key>' with component unet | text_encoder
    (| text_encoder_2 on SDXL)."""

    kind: str  # "full" | "lora"
    tensors: dict = field(default_factory=dict)
    rank: int | None = None
    alpha: float | None = None

    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.tensors})

    def part(self, component: str) -> dict:
        pre = component + "."
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}

    def meta(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "components": self.components()}


def _modules(bundle) -> dict:
    return {"unet": bundle.unet, **bundle.text_modules()}


def _owner(module: torch.nn.Module, name: str):
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, new: dict):
    """Puts the tensors of `new` (name -> tensor) in place of the named parameters; restores them."""
    saved = []
    try:
        for name, tensor in new.items():
            owner, leaf = _owner(module, name)
            old = owner._parameters[leaf]
            saved.append((owner, leaf, old))
            owner._parameters[leaf] = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
                tensor.to(old.device, old.dtype), requires_grad=False)
        yield
    finally:
        for owner, leaf, old in reversed(saved):
            owner._parameters[leaf] = old


def lora_config(component: str, rank: int, alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                      target_modules=LORA_TARGETS[component])


def unwrap_lora(module: torch.nn.Module) -> None:
    """Puts each peft-wrapped layer's own base layer back, so the module is as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        parent, leaf = _owner(module, name)
        setattr(parent, leaf, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # what inject_adapter_in_model leaves behind
        if attr in module.__dict__:
            delattr(module, attr)


@contextlib.contextmanager
def lora_injected(module: torch.nn.Module, component: str, rank: int, alpha: float | None = None,
                  state: dict | None = None):
    """peft LoRA layers on `module` for the block; `state` loads trained adapter weights."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(lora_config(component, rank, alpha), module, adapter_name=ADAPTER)
    try:
        if state is not None:
            result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"LoRA weights have keys this {component} lacks: {unexpected[:3]} ...")
        yield module
    finally:
        unwrap_lora(module)


@contextlib.contextmanager
def applied(bundle, weights: TunedWeights | None, scale: float = 1.0):
    """The bundle's U-Net and text encoder carry `weights` inside the block; nothing outside."""
    if weights is None:
        yield bundle
        return
    modules = _modules(bundle)
    with contextlib.ExitStack() as stack:
        for comp in weights.components():
            part = weights.part(comp)
            if comp not in modules:
                raise ValueError(f"weights: this model has no {comp}; the weights are for another kind of model")
            module = modules[comp]
            if weights.kind == "full":
                params = dict(module.named_parameters())
                new = {n: params[n].detach() + scale * d.to(params[n].device, params[n].dtype)
                       for n, d in part.items()}
                stack.enter_context(swapped_parameters(module, new))
            elif weights.kind == "lora":
                alpha = weights.alpha * scale if weights.alpha is not None else None
                stack.enter_context(lora_injected(module, comp, weights.rank, alpha, part))
            else:
                raise ValueError(f"weights: unknown kind {weights.kind!r}")
        yield bundle
