"""Joint fine-tune (paper, end of section 3; Break-A-Scene stage 2): tokens and model weights
together, masks fixed, same losses and concept-subset sampling; each step's prompt is worded as
the learned state's (`LearnConfig.step_prompt`), so tokens learned on one wording are tuned on it.

The base model is never changed: full mode trains float32 copies of the weights swapped in
for the run and keeps `trained - base` as a delta; LoRA mode trains peft adapters that are
removed again afterwards. Either result is a `TunedWeights` applied only inside a context.

As Break-A-Scene's stage 2: the gradients of everything trained (weights and concept vectors)
are clipped to a total norm of 1.0 (`--max_grad_norm`), and fp16 mixed precision on CUDA runs
with a loss scaler (accelerate's GradScaler; a step whose scaled gradients overflow is skipped
and the scale lowered). AdamW's moments are kept with the state, so a resumed fine-tune goes on
as an unbroken one would. BaS's prior preservation is an option (`prior_weight` > 0, em_core/prior.py),
off by default: it costs `class_images` generations by the base model first and a second U-Net
pass every step (docs/deviations.md).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from .atomic import prepare_out
from .attention import AttentionCapture
from .concepts import ConceptSet
from .masks import latent_masks
from .prior import FOLDER, class_images, prepare_class_images, prior_loss
from .concept_file import save_run
from .state import LearnState
from .steps import run_span
from .training import concept_step_loss, saved_on_exit
from .weights import ADAPTER, TunedWeights, lora_injected, swapped_parameters

MODES = ("full", "lora")
# The U-Net weights a full fine-tune may train, by the parts of their diffusers names (None: all).
UNET_PARAMS = {"all": None,
               "attention": (".attentions.",),  # the transformer blocks, not the ResNets
               "cross_kv": (".attn2.to_k.", ".attn2.to_v.")}  # the cross-attention key and value projections


@dataclass
class FinetuneConfig:
    steps: int = 400
    mode: str = "full"  # full | lora
    lr: float | None = None  # None: 2e-6 for full (Break-A-Scene), 1e-4 for LoRA (diffusers' LoRA examples)
    token_lr: float | None = None  # None: the same as lr
    rank: int = 4
    alpha: float | None = None  # None: equal to rank (scale 1)
    train_text_encoder: bool = True
    # Which U-Net weights a full fine-tune trains: "all" (Break-A-Scene); "attention", the
    # transformer blocks only; "cross_kv", only the cross-attention key and value projections
    # (Custom Diffusion's choice). benchmarks/README.md measures them on the tiny world.
    unet_params: str = "all"
    attn_weight: float = 1e-2
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16; fp16 on a GPU only, bf16 on a GPU or the CPU
    max_grad_norm: float = 1.0  # clip the total gradient norm (Break-A-Scene's --max_grad_norm); 0: off
    # Keep AdamW's moments in the state (and its files) so a resumed fine-tune restores them; they
    # are twice the trainable weights (7.6 GB for a full SD 1.5 fine-tune, a few MB for a LoRA).
    keep_moments: bool = True
    flip: bool = True
    layers: str = "coarse"
    seed: int = 0
    save_every: int = 100
    # Prior preservation (BaS: on, weight 1.0, 100 images of "a photo at the beach"); 0: off.
    prior_weight: float = 0.0
    class_prompt: str = "a photo at the beach"
    class_images: int = 100
    class_steps: int = 50  # the base model's sampling steps per class image (the diffusers pipeline's default)
    # Not in Break-A-Scene; 0: off. > 0: the U-Net's prediction outside each step's masks is held at
    # the base U-Net's, on the same text (em_core/losses.py `outside_loss`). It costs a frozen copy
    # of the U-Net and a second U-Net pass every step.
    outside_weight: float = 0.0
    # Not in Break-A-Scene; off by default. On: each step pastes its concepts (inside the union of
    # their masks) onto one of the class images, so they are seen off their own scene
    # (em_core/training.py `on_backdrop`). It makes the class images as prior preservation does.
    backdrops: bool = False

    def __post_init__(self):
        bad = []
        if self.mode not in MODES:
            bad.append(f"mode={self.mode!r} (full or lora)")
        if self.steps < 0:
            bad.append(f"steps={self.steps}")
        if self.unet_params not in UNET_PARAMS:
            bad.append(f"unet_params={self.unet_params!r} (one of {', '.join(UNET_PARAMS)})")
        elif self.unet_params != "all" and self.mode != "full":
            bad.append(f"unet_params={self.unet_params!r} with mode={self.mode!r} (it is for mode='full')")
        if self.rank < 1:
            bad.append(f"rank={self.rank}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            bad.append(f"mixed_precision={self.mixed_precision!r} (no, fp16 or bf16)")
        if self.lr is not None and self.lr <= 0:
            bad.append(f"lr={self.lr}")
        if self.max_grad_norm < 0:
            bad.append(f"max_grad_norm={self.max_grad_norm} (0: no clipping)")
        if self.prior_weight < 0:
            bad.append(f"prior_weight={self.prior_weight} (0: no prior preservation)")
        if self.uses_class_images and (self.class_images < 1 or self.class_steps < 1):
            bad.append(f"class_images={self.class_images}, class_steps={self.class_steps} (both at least 1 "
                       "with prior preservation or backdrops)")
        if self.outside_weight < 0:
            bad.append(f"outside_weight={self.outside_weight} (0: off)")
        if bad:
            raise ValueError("fine-tune settings out of range: " + ", ".join(bad))

    @property
    def uses_class_images(self) -> bool:
        """Prior preservation and backdrops both need the base model's class images."""
        return self.prior_weight > 0 or self.backdrops

    @property
    def weight_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-6 if self.mode == "full" else 1e-4)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _trainable_full(module, existing: dict, skip_token_table: bool, only=None) -> dict:
    """float32 Parameters = base (+ an earlier delta), for every weight but the token table
    (or, given `only`, the weights whose names hold one of its parts).

    The token table stays frozen: concept vectors train on their own and every other row
    must not move.
    """
    out = {}
    table = module.get_input_embeddings().weight if skip_token_table else None
    for name, p in module.named_parameters():
        if p is table or (only and not any(part in f".{name}" for part in only)):
            continue
        base = p.detach().float()
        if name in existing:
            base = base + existing[name].to(base.device, torch.float32)
        out[name] = torch.nn.Parameter(base.clone(), requires_grad=True)
    return out


@contextlib.contextmanager
def _training_modules(bundle, cfg: FinetuneConfig, previous: TunedWeights | None):
    """Yields (parameters to train, their names, a function returning the TunedWeights learned so far).

    Components an earlier fine-tune tuned but this one does not train (e.g. the text encoder
    when train_text_encoder is off) keep their tuned weights, frozen, and stay in the result.
    """
    modules = {"unet": bundle.unet, **bundle.text_modules()}
    train = ["unet"] + (list(bundle.text_modules()) if cfg.train_text_encoder else [])
    kept = [c for c in (previous.components() if previous else []) if c not in train]
    if previous is not None and previous.kind != cfg.mode:
        raise ValueError(f"the state holds {previous.kind} weights; continue with mode={previous.kind!r}")
    if previous is not None and previous.kind == "lora" and previous.rank != cfg.rank:
        raise ValueError(f"the state's LoRA has rank {previous.rank}; continue with rank={previous.rank} "
                         "(lora_rank in the node)")
    with contextlib.ExitStack() as stack:
        params, names, base = [], [], {}
        if cfg.mode == "full":
            # Earlier deltas this run does not train (a kept component's, and those on weights a
            # trained component leaves frozen) stay applied, and in the result.
            trained, fixed = {}, {c: previous.part(c) for c in kept}
            for comp in train:
                module = modules[comp]
                prev = previous.part(comp) if previous else {}
                only = UNET_PARAMS[cfg.unet_params] if comp == "unet" else None
                new = _trainable_full(module, prev, comp != "unet", only)
                fixed[comp] = {n: d for n, d in prev.items() if n not in new}
                base[comp] = {n: p.detach() for n, p in module.named_parameters() if n in new}
                stack.enter_context(swapped_parameters(module, new))
                trained[comp] = new
                params += list(new.values())
                names += [f"{comp}.{n}" for n in new]
            for comp, deltas in fixed.items():
                own = dict(modules[comp].named_parameters())
                stack.enter_context(swapped_parameters(modules[comp], {
                    n: own[n].detach() + d.to(own[n].device, own[n].dtype) for n, d in deltas.items()}))

            def result() -> TunedWeights:
                tensors = {f"{c}.{n}": d.clone() for c, deltas in fixed.items() for n, d in deltas.items()}
                for comp, new in trained.items():
                    for n, p in new.items():
                        d = p.detach() - base[comp][n].float()
                        if bool(d.any()):
                            tensors[f"{comp}.{n}"] = d.cpu()
                return TunedWeights("full", tensors)
        else:
            from peft.functional import get_peft_model_state_dict

            alpha = previous.alpha if previous is not None else cfg.alpha
            for comp in train + kept:
                module = modules[comp]
                prev = previous.part(comp) if previous and comp in previous.components() else None
                # New adapters' random init comes from the run's seed, not the global generator, so a
                # fine-tune is the same every time (the global generator is left as it was).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed * 1_000_003 + ("unet", "text_encoder", "text_encoder_2").index(comp))
                    stack.enter_context(lora_injected(module, comp, cfg.rank, alpha, prev))
                for n, p in module.named_parameters():
                    if "lora_" in n:
                        p.data = p.data.float()
                        p.requires_grad_(comp in train)
                        if comp in train:
                            params.append(p)
                            names.append(f"{comp}.{n}")

            def result() -> TunedWeights:
                tensors = {}
                for comp in train + kept:
                    sd = get_peft_model_state_dict(modules[comp], adapter_name=ADAPTER)
                    tensors.update({f"{comp}.{k}": v.detach().float().cpu().clone() for k, v in sd.items()})
                return TunedWeights("lora", tensors, rank=cfg.rank, alpha=alpha or float(cfg.rank))
        yield params, names, result


@contextlib.contextmanager
def _train_mode(bundle, cfg: FinetuneConfig):
    """Train mode and, if asked, gradient checkpointing, for the run only."""
    unet, encoders = bundle.unet, bundle.text_encoders
    try:
        unet.train()
        for te in encoders:
            te.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for te in encoders:
                te.gradient_checkpointing_enable()
        yield
    finally:
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
            for te in encoders:
                te.gradient_checkpointing_disable()
        unet.eval()
        for te in encoders:
            te.eval()


def _autocast(bundle, cfg: FinetuneConfig):
    """The forward's autocast: fp16 or bf16 on a GPU, bf16 on the CPU too (torch's CPU autocast
    is bf16 first, as accelerate's is), otherwise float32."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    kind = bundle.device.type
    if kind == "cuda" or (kind == "cpu" and cfg.mixed_precision == "bf16"):
        return torch.autocast(kind, dtype=torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16)
    warnings.warn(f"mixed precision {cfg.mixed_precision} is for CUDA GPUs (bf16 also runs on the CPU); running "
                  f"in float32 on {kind}", stacklevel=3)
    return contextlib.nullcontext()


def _adamw(groups: list, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CUDA and the CPU. The foreach path a GPU otherwise takes
    holds a temporary as large as all the trainable weights during each step (3.6 GB more for a
    full SD 1.5 fine-tune); the fused one holds none, and is faster (benchmarks/optimizer.py).
    Other devices keep torch's default: some accept fused=True and only fail at the first step.
    Where torch refuses the fused kernel (an older torch, parameters of a dtype or device it lacks
    a kernel for), its default AdamW is used and a warning says why."""
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            warnings.warn(f"fine-tune: torch {torch.__version__} refused the fused AdamW on {device.type} "
                          f"({type(exc).__name__}: {exc}); using its default (foreach) AdamW, which holds a "
                          "temporary as large as the trained weights during each step", stacklevel=2)
    return torch.optim.AdamW(groups)


def _grad_scaler(bundle, cfg: FinetuneConfig) -> torch.amp.GradScaler:
    """fp16 on CUDA: a loss scaler, as accelerate gives Break-A-Scene; elsewhere a disabled one, whose
    scale/unscale/step/update are plain pass-throughs (bf16 and float32 need none)."""
    on = cfg.mixed_precision == "fp16" and bundle.device.type == "cuda"
    return torch.amp.GradScaler(bundle.device.type if on else "cpu", enabled=on)


def _restore_moments(opt: torch.optim.Optimizer, named: dict, saved: dict | None) -> int:
    """Puts a saved fine-tune's AdamW state back on the parameters of the same name and shape;
    returns how many got theirs (the others start afresh, as on a first step)."""
    if not saved:
        return 0
    fused = any(g.get("fused") for g in opt.param_groups)
    n = 0
    for name, p in named.items():
        s = saved.get(name)
        if s is None or s["exp_avg"].shape != p.shape:
            continue
        opt.state[p] = {"step": torch.tensor(float(s["step"]), dtype=torch.float32,
                                             device=p.device if fused else "cpu"),
                        "exp_avg": s["exp_avg"].to(p.device, p.dtype, copy=True),
                        "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype, copy=True)}
        n += 1
    return n


def _moments(opt: torch.optim.Optimizer, named: dict) -> dict:
    """{name: {step, exp_avg, exp_avg_sq}} on the CPU. Where the parameters live on the CPU these are
    the optimiser's own tensors, not copies: the state takes them over once the optimiser lets go."""
    out = {}
    for name, p in named.items():
        s = opt.state.get(p)
        if s and "exp_avg" in s:
            out[name] = {"step": int(float(s["step"])), "exp_avg": s["exp_avg"].detach().cpu(),
                         "exp_avg_sq": s["exp_avg_sq"].detach().cpu()}
    return out


def _all_finite(tensors: list) -> bool:
    """One device sync for the lot, not one per tensor. Takes the list so that no name outlives the
    check: a list of the step's gradients kept in the loop held them through the next backward
    (+3.6 GB from the second step of a full SD 1.5 fine-tune)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def finetune_steps(state: LearnState, steps: int, what: str = "steps") -> tuple[int, int]:
    """(run_from, end) in fine-tune steps for a command asking `steps` of `state`: a finished
    fine-tune (or none yet) gets `steps` more; an unfinished one goes on to `steps` after the step
    it started from, so the same command finishes it (em_core/steps.py). Pass `end` as
    FinetuneConfig.steps and `run_from` to `finetune`."""
    ft = state.finetune or {}
    return run_span(int(ft.get("step", 0)), ft.get("status"), int(ft.get("run_from", 0)), steps, what)


def finetune(bundle, images, state: LearnState, config: FinetuneConfig | None = None, *, out=None,
             should_stop=None, on_step=None, progress: bool = True, run_from: int | None = None) -> LearnState:
    """Runs the fine-tune's remaining steps on a learned state, up to `config.steps` fine-tune
    steps in all; returns a new state. `run_from`: the fine-tune step this run counts from,
    recorded as state.finetune["run_from"] so that a rerun can finish it (em_core/steps.py;
    `finetune_steps` works both out); default: the step the state stands at.

    Stops early, keeping what was learned, on a non-finite loss or gradient ('nan'), on
    `should_stop()` ('cancelled') or Ctrl-C ('interrupted', saved, re-raised).
    """
    state = state.copy()
    cfg = config or (FinetuneConfig.from_dict(state.finetune["config"]) if state.finetune else FinetuneConfig())
    if out is not None:
        prepare_out(out)
    if any(m is None for m in state.masks) or not state.mask_history:
        raise ValueError("state: it has no masks yet; run `learn` (at least its mask initialisation) first")
    if state.finetune and state.finetune["config"]["mode"] != cfg.mode:
        raise ValueError(f"state: fine-tuned in {state.finetune['config']['mode']} mode before; keep that mode")
    step0 = state.finetune["step"] if state.finetune else 0
    run_from = step0 if run_from is None else run_from
    prior = None
    if cfg.uses_class_images and step0 < cfg.steps:  # the base model's, before any weight moves
        made = class_images(bundle, cfg.class_prompt, cfg.class_images, out, steps=cfg.class_steps,
                            should_stop=should_stop, progress=progress)
        if len(made) < cfg.class_images:  # nothing trained yet: the state stays as it was, images kept on disk
            state.finetune = {**(state.finetune or {"config": cfg.to_dict(), "step": step0}), "run_from": run_from,
                              "status": "cancelled",
                              "message": f"cancelled while making class images ({len(made)} of "
                                         f"{cfg.class_images} kept in {FOLDER}/)"}
            return state
        prior = prepare_class_images(bundle, made, cfg.class_prompt)
    scaler_state = (state.finetune or {}).get("scaler")
    saved_moments = state.finetune_optimizer if cfg.keep_moments and step0 > 0 else None
    if saved_moments is not None and saved_moments["step"] != step0:
        warnings.warn(f"state: its AdamW moments are from fine-tune step {saved_moments['step']}, the state "
                      f"from step {step0}; they start afresh", stacklevel=2)
        saved_moments = None
    state.finetune_optimizer = None
    state.finetune = {"config": cfg.to_dict(), "step": step0, "run_from": run_from, "status": "running",
                      "message": ""}
    state.history.setdefault("finetune", [])
    state.history["finetune"] = [h for h in state.history["finetune"] if h["step"] < step0]
    lat = [latent_masks(m, img.latent_hw) for m, img in zip(state.masks, images)]
    token_id = dict(zip(state.concepts.names, state.concepts.token_ids(bundle)))
    ft = state.finetune

    def save():
        if out is not None:
            save_run(state, bundle, out)

    def interrupted():
        ft["status"], ft["message"] = "interrupted", f"interrupted after step {ft['step']}"


    with torch.inference_mode(False), torch.enable_grad(), saved_on_exit(save, interrupted):
        for img in images:
            if img.latent_mean.is_inference():
                img.latent_mean, img.latent_std = img.latent_mean.clone(), img.latent_std.clone()
        vectors = torch.nn.Parameter(state.concepts.vectors.detach().clone().float().to(bundle.device))
        # The base U-Net, frozen, before any delta or adapter goes in: the same at every step of a
        # fine-tune however often it is resumed.
        base_unet = _frozen_copy(bundle.unet) if cfg.outside_weight > 0 and ft["step"] < cfg.steps else None
        with tqdm(total=cfg.steps, initial=min(step0, cfg.steps), disable=not progress, desc="finetune",
                  unit="step") as bar, _training_modules(bundle, cfg, state.weights) as (params, names, result), \
                _train_mode(bundle, cfg), AttentionCapture(bundle.unet, cfg.layers) as capture:
            opt = _adamw([{"params": params, "lr": cfg.weight_lr},
                          {"params": [vectors], "lr": cfg.token_lr or cfg.weight_lr}], vectors.device)
            named = {**dict(zip(names, params)), "vectors": vectors}
            _restore_moments(opt, named, saved_moments and saved_moments["state"])
            saved_moments = None
            scaler = _grad_scaler(bundle, cfg)
            if scaler.is_enabled() and scaler_state:
                scaler.load_state_dict(scaler_state)
            trained = [vectors, *params]

            def keep_moments():
                if cfg.keep_moments:
                    state.finetune_optimizer = {"step": ft["step"], "state": _moments(opt, named)}
                if scaler.is_enabled():
                    ft["scaler"] = scaler.state_dict()

            try:
                while ft["step"] < cfg.steps:
                    if should_stop is not None and should_stop():
                        ft["status"], ft["message"] = "cancelled", f"cancelled after step {ft['step']}"
                        break
                    with _autocast(bundle, cfg):
                        loss, info = concept_step_loss(bundle, images, state.concepts, vectors, lat, token_id,
                                                       ft["step"], cfg.seed + 104729, cfg.flip, cfg.attn_weight,
                                                       capture, prompt_form=state.config.step_prompt,
                                                       base_unet=base_unet, outside_weight=cfg.outside_weight,
                                                       backdrops=prior if cfg.backdrops else None)
                        if prior is not None and cfg.prior_weight > 0:
                            lp = prior_loss(bundle, prior, cfg.class_prompt, ft["step"], cfg.seed + 15485863)
                            loss = loss + cfg.prior_weight * lp
                            info["prior_loss"] = lp.item()
                            info["loss"] += cfg.prior_weight * info["prior_loss"]
                    info["phase"] = "finetune"
                    if not math.isfinite(info["loss"]):
                        ft["status"], ft["message"] = "nan", f"loss was not finite at step {ft['step']}"
                        break
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)  # clip the true gradients
                    if cfg.max_grad_norm:
                        norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
                        info["grad_norm"] = float(norm)  # before clipping; one device sync, as the check's
                        finite = math.isfinite(info["grad_norm"])
                    else:
                        finite = _all_finite([p.grad for p in trained if p.grad is not None])
                    if not finite and not scaler.is_enabled():
                        ft["status"], ft["message"] = "nan", f"gradients were not finite at step {ft['step']}"
                        break
                    if not finite:  # fp16 overflow: the scaler skips this update and lowers its scale
                        info["skipped"] = True
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)  # freed now, not after the next forward
                    ft["step"] += 1
                    state.history["finetune"].append(info)
                    bar.update(1)
                    bar.set_postfix(loss=f"{info['loss']:.4f}")
                    if on_step is not None:
                        on_step(state, info)
                    # The last step's save is the one on the way out, after the optimiser is freed.
                    if out is not None and ft["step"] % cfg.save_every == 0 and ft["step"] < cfg.steps:
                        _collect(state, vectors, result)
                        keep_moments()
                        save()
                        state.finetune_optimizer = None  # the optimiser's live tensors: not held past the save
                else:
                    ft["status"] = "done"
            finally:
                # Gradients, moments and a dropped step's graph are done with: freed before the
                # result (a full fine-tune's delta, as large as the weights) is built beside them.
                loss = None
                opt.zero_grad(set_to_none=True)
                keep_moments()  # on the CPU these are the optimiser's tensors: the state takes them over
                opt.state.clear()
                # While the adapters are still in place: what was learned, however the loop ended.
                _collect(state, vectors, result)
    return state


def _frozen_copy(unet):
    return copy.deepcopy(unet).requires_grad_(False).eval()


def _collect(state: LearnState, vectors: torch.Tensor, result) -> None:
    state.concepts = ConceptSet(state.concepts.names, state.concepts.init_words, vectors.detach().cpu().clone())
    state.weights = result()
