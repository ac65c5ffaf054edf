"""The precision policy: which dtypes the engine computes in on which device, for a loaded model
and for the joint fine-tune's mixed precision. The ComfyUI nodes ask here rather than decide."""
from __future__ import annotations

import torch

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]  # the choices offered for the fine-tune's mixed precision
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype the engine's modules hold a model in, given the one it was loaded in: on the CPU
    float32 (half precision there is slow and lacks kernels); a dtype the engine cannot compute in
    (e.g. fp8 storage) float32; bf16 on a GPU without it fp16."""
    dev = torch.device(device)
    if dev.type == "cpu" or dtype not in COMPUTE_DTYPES:
        return torch.float32
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


def mixed_precision_for(choice: str, device) -> str:
    """The fine-tune's mixed precision (the engine's no / fp16 / bf16) for the node's choice on the
    model's device, refused with the input's name where the device cannot run it. auto: bf16 on a
    CUDA GPU that has it, fp16 on one that has not, float32 elsewhere."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if choice == "auto":
        return "bf16" if bf16 else "fp16" if cuda else "no"
    if choice == "fp32":
        return "no"
    if choice == "fp16":
        if not cuda:
            raise ValueError(f"mixed_precision: fp16 runs on CUDA GPUs only and the model is on {dev.type}; "
                             "choose fp32 (or auto)")
        return "fp16"
    if choice == "bf16":
        if cuda and not bf16:
            raise ValueError(f"mixed_precision: this GPU ({torch.cuda.get_device_name(dev)}) does not support bf16; "
                             "choose fp16, fp32 or auto")
        if not cuda and dev.type != "cpu":
            raise ValueError(f"mixed_precision: bf16 runs on CUDA GPUs that support it and on the CPU, not on "
                             f"{dev.type}; choose fp32 (or auto)")
        return "bf16"
    raise ValueError(f"mixed_precision: {choice!r} is not one of {', '.join(PRECISIONS)}")
