"""AdamW's implementations on a full fine-tune's trainable weights: step time and the tensor
memory a step holds beyond the weights, their gradients and AdamW's two moments.

A GPU picks the foreach path by default, the CPU the per-tensor loop; the fine-tune asks for the
fused kernel (em_core.finetune._adamw). The weights are float32 copies shaped as the fine-tune's
(U-Net and text encoder, the token table left out) with random gradients; each implementation
takes one step to create its moments, then `--repeats` timed steps (median) and one counted
step (the counter's per-op bookkeeping would weigh on the timings).

    python benchmarks/optimizer.py                      # shipped tiny-world model
    python benchmarks/optimizer.py --model sd15         # SD-1.5-shaped: ~16 GB of float32 state
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from em_core.atomic import write_json
from em_core.provenance import begin, provenance

from memory import LiveTensorBytes  # this folder's live-tensor counter
from speed import _bundle

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"loop (CPU default)": {"foreach": False}, "foreach (GPU default)": {"foreach": True},
         "fused (the fine-tune's)": {"fused": True}}


def trainable_shapes(model: str) -> list[torch.Size]:
    bundle = _bundle(model, "cpu", "bf16")
    table = bundle.text_encoder.get_input_embeddings().weight
    shapes = [p.shape for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p is not table]
    del bundle
    gc.collect()
    return shapes


def one(shapes, kw: dict, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=2e-6, **kw)
    opt.step()  # creates the moments
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    held = [t for p in params for t in (p, p.grad, *opt.state[p].values())]
    with LiveTensorBytes(held) as live:
        opt.step()
    state = live.now
    del held, opt, params
    gc.collect()
    return {"step_s": statistics.median(times), "state_mb": state / 2**20, "extra_peak_mb": (live.peak - state) / 2**20}


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "tiny_world" / "model"),
                    help="a diffusers folder, or 'sd15' for an SD-1.5-shaped model")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per implementation (median)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = trainable_shapes(args.model)
    n = sum(s.numel() for s in shapes)
    print(f"model {args.model}: {len(shapes)} trainable tensors, {n / 1e6:.1f} M weights "
          f"({4 * n / 2**20:.0f} MB in float32), torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = {}
    for name, kw in KINDS.items():
        rows[name] = one(shapes, kw, max(1, args.repeats))
        r = rows[name]
        print(f"{name:<26} step {r['step_s']:.3f} s   weights+grads+moments {r['state_mb']:.0f} MB   "
              f"extra at peak {r['extra_peak_mb']:.0f} MB", flush=True)
    if args.json:
        write_json(Path(args.json), {"model": args.model, "tensors": len(shapes), "weights": n,
                                     "torch": torch.__version__, "repeats": args.repeats, "rows": rows,
                                     **provenance(config=vars(args))})


if __name__ == "__main__":
    main()
