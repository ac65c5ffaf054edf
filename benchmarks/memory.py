"""Peak memory of the joint fine-tune: full and LoRA, with and without gradient checkpointing.

Each setting runs in its own process, so one peak never hides another. On the CPU the figure is
the process's peak resident memory (ru_maxrss) and, apart, its growth over the memory held once
the model and the concepts are loaded; on a GPU it is torch.cuda.max_memory_allocated.

`--tensor-peak` also counts, on the CPU, the bytes of live tensors at their peak (model,
trainable copies or adapters, gradients, optimiser state, activations: every storage an op
makes, until it is freed): the quantity torch.cuda.max_memory_allocated reports on a GPU,
without the CUDA context, kernel workspaces and allocator slack around it. It is given twice:
over the steps, and over the whole call, whose end builds the result (a full fine-tune's delta)
beside the trainable weights; on a GPU that delta goes to host memory a tensor at a time, so the
first figure is the one that stands for the GPU. With `--dtype bf16
--mixed-precision bf16` the fine-tune runs under the CPU's bf16 autocast as it would under a
GPU's, so the count stands in for a GPU's figure; it is not a measurement of one.

    python benchmarks/memory.py                                   # shipped tiny-world model, 64 px
    python benchmarks/memory.py --model sd15 --size 256 --steps 2  # SD-1.5-shaped, random weights
    python benchmarks/memory.py --model sd15 --size 512 --steps 1 --only lora lora+ckpt   # LoRA at 512 px
    python benchmarks/memory.py --model DIR --size 512 --dtype fp16 --mixed-precision fp16   # on a GPU
    python benchmarks/memory.py --model sd15 --size 512 --steps 2 --dtype bf16 --mixed-precision bf16 \
        --tensor-peak        # the GPU's quantity, counted on the CPU (2 steps: the first has no moments yet)
    python benchmarks/memory.py --model sdxl --size 1024 --steps 2 --dtype bf16 --mixed-precision bf16 \
        --tensor-peak --only lora+ckpt lora    # SDXL-shaped: about 14 GB to build, 12 minutes on 1 CPU thread
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from em_core.atomic import write_json
from em_core.provenance import begin, provenance

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"full": ("full", False), "full+ckpt": ("full", True), "lora": ("lora", False), "lora+ckpt": ("lora", True)}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, while ops run inside it: what a GPU's
    caching allocator would be asked for, counted on any device. A storage is counted when an op
    first returns it (or, for `tensors` given up front, at once), again when an op returns it
    resized, and dropped when it is freed. The drop relies on torch keeping a storage's Python
    object for as long as the storage lives (torch 2.0 and later)."""

    def __init__(self, tensors=()):
        super().__init__()
        self.seen: dict[int, int] = {}  # id of a storage's StorageImpl -> its bytes
        self.now = self.peak = 0
        for t in tensors:
            self._count(t)

    def _count(self, t) -> None:
        if t.layout != torch.strided:  # sparse and other layouts have no single storage
            return
        st = t.untyped_storage()
        key, size = st._cdata, st.nbytes()
        if key in self.seen:
            self.now += size - self.seen[key]  # resized in place (resize_, out=)
            self.seen[key] = size
        elif size:
            self.seen[key] = size
            self.now += size
            weakref.finalize(st, self._free, key)  # the Python storage lives as long as its StorageImpl
        self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        self.now -= self.seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._count(t)
        return out


def child(args) -> dict:
    from em_core.config import LearnConfig
    from em_core.dataset import prepare_image
    from em_core.em_loop import learn, start_state
    from em_core.finetune import FinetuneConfig, finetune
    from em_core.tiny_world.scenes import random_scene

    from speed import _bundle  # this folder's model loading: sd15 or a diffusers folder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = _bundle(args.model, dev, args.dtype)
    path = Path("/tmp") / f"em_core_mem_scene_{args.size}.png"
    random_scene(3, size=args.size or 64, n_objects=2).image.save(path)
    img = prepare_image(bundle, path, "a photo of [v1] and [v2] on [v3]", args.size)
    state = learn(bundle, [img], start_state(bundle, [img], LearnConfig(steps=0, mask_timesteps=2, mask_batch=2)),
                  progress=False)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    cfg = FinetuneConfig(steps=args.steps, mode=args.mode, gradient_checkpointing=args.checkpointing,
                         mixed_precision=args.mixed_precision, save_every=10 ** 9)
    tracker = None
    if args.tensor_peak and dev == "cpu":
        held = [t for m in (bundle.unet, *bundle.text_encoders, bundle.vae) for t in (*m.parameters(), *m.buffers())]
        tracker = LiveTensorBytes(held + [img.latent_mean, img.latent_std])
    steps_peak = [0]  # the count's peak up to the end of the last step, before the result is built

    def on_step(*_):
        steps_peak[0] = tracker.peak

    with tracker or contextlib.nullcontext():
        t0 = time.perf_counter()
        done = finetune(bundle, [img], state, cfg, progress=False, on_step=on_step if tracker else None)
        seconds = time.perf_counter() - t0
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"mode": args.mode, "checkpointing": args.checkpointing, "device": dev, "dtype": args.dtype,
           "mixed_precision": args.mixed_precision, "loaded_mb": round(base), "peak_mb": round(peak),
           "growth_mb": round(peak - base), "steps": args.steps, "seconds_per_step": seconds / max(1, args.steps),
           "status": done.finetune["status"]}
    if tracker is not None:  # its per-op bookkeeping slows the steps: their time means nothing here
        row["tensor_peak_mb"] = round(tracker.peak / 2**20)
        row["tensor_steps_peak_mb"] = round(steps_peak[0] / 2**20)
        row["seconds_per_step"] = None
    return row


def _secs(s) -> str:
    return "-" if s is None else f"{s:.2f}"


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "tiny_world" / "model"),
                    help="a diffusers folder, or 'sd15' / 'sdxl' for an SD-1.5- / SDXL-shaped model with random "
                         "weights ('tiny_xl': the tests' tiny SDXL)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None,
                    help="settings to run (default: all four); ckpt = gradient checkpointing")
    ap.add_argument("--tensor-peak", action="store_true",
                    help="on the CPU, also count live tensor bytes at their peak (slower steps)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    if args.only == []:
        ap.error("--only: name at least one setting: " + ", ".join(SETTINGS))
    for mode, ckpt in (SETTINGS[k] for k in dict.fromkeys(args.only or SETTINGS)):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--steps", str(args.steps),
               "--dtype", args.dtype, "--mixed-precision", args.mixed_precision, "--mode", mode]
        cmd += (["--size", str(args.size)] if args.size else []) + (["--checkpointing"] if ckpt else [])
        cmd += ["--tensor-peak"] if args.tensor_peak else []
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"mode": mode, "checkpointing": ckpt, "error": res.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmodel {args.model}  side {args.size or 'model default'}  dtype {args.dtype}")
    print(f"{'mode':<5} {'ckpt':<5} {'loaded MB':>10} {'peak MB':>9} {'growth MB':>10} {'s/step':>7} "
          f"{'tensors MB: steps':>18} {'whole':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<5} {str(r['checkpointing']):<5} failed: {r['error']}")
            continue
        print(f"{r['mode']:<5} {str(r['checkpointing']):<5} {r['loaded_mb']:>10} {r['peak_mb']:>9} "
              f"{r['growth_mb']:>10} {_secs(r['seconds_per_step']):>7} {r.get('tensor_steps_peak_mb', '-'):>18} "
              f"{r.get('tensor_peak_mb', '-'):>6}")
    if args.json:
        cfg = {k: v for k, v in vars(args).items() if k not in ("child", "mode", "checkpointing")}
        write_json(Path(args.json), {"model": args.model, "size": args.size, "rows": rows, **provenance(config=cfg)})


if __name__ == "__main__":
    main()
