"""The EM-like loop: optimise concept tokens under masks, re-estimate masks from attention.

Per step: one image, a random non-empty subset of its concepts ("a photo of [v1] and [v3]"),
a random timestep and noise; loss = masked diffusion loss + w * cross-attention loss; only the
concept vectors move (the M-step, `_Run.token_step`). Every `refresh_every` steps the masks are
re-estimated with the current tokens (the E-step, `_Run.refresh_masks`): cross-attention averaged
over random timesteps (`mask_timesteps` for the first estimate, `refresh_timesteps` after),
threshold, DenseCRF.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import prepare_out
from .attention import AttentionCapture
from .concept_file import save_run
from .concepts import ConceptSet
from .config import LearnConfig
from .crf import CRFParams
from .dataset import TrainImage
from .eval_loss import fixed_noise_loss
from .masks import estimate_masks, iou, latent_masks, refine_keeping
from .state import LearnState
from .steps import run_span
from .training import concept_step_loss, saved_on_exit, step_rng


class StopLearning(Exception):
    """Raised inside a step to end the run early while keeping the last good state."""


def start_state(bundle, images: list[TrainImage], config: LearnConfig, init_words: dict | None = None,
                fixed_masks: dict | None = None) -> LearnState:
    """A fresh state: new tokens for every `[vN]` in the prompts; user masks where given.

    `fixed_masks` maps (image index, name) -> bool mask (H, W) at the image's working size.
    """
    names = list(dict.fromkeys(n for img in images for n in img.names))
    if config.background is not None and config.background not in names:
        raise ValueError(f"background: {config.background} appears in no prompt; the concepts are {names}")
    concepts = ConceptSet.create(bundle, names, init_words, seed=config.seed)
    fixed_masks = fixed_masks or {}
    masks, fixed = [], []
    for i, img in enumerate(images):
        given = [n for n in img.names if (i, n) in fixed_masks]
        for (j, n) in fixed_masks:
            if j == i and n not in img.names:
                raise ValueError(f"mask: {n} is given a mask on image {i + 1}, whose prompt does not name it")
        fixed.append(given)
        if given:
            m = np.zeros((len(img.names), img.size[1], img.size[0]), dtype=bool)
            for n in given:
                user = np.asarray(fixed_masks[(i, n)], dtype=bool)
                if user.shape != m.shape[1:]:
                    raise ValueError(f"mask for {n} on image {i + 1}: shape {user.shape}, expected {m.shape[1:]}")
                if not user.any():
                    raise ValueError(f"mask for {n} on image {i + 1} is empty; give a mask with the concept in white")
                m[img.names.index(n)] = user
            masks.append(m)
        else:
            masks.append(None)
    records = [dict(path=img.path, prompt=img.prompt, names=img.names, size=list(img.size),
                    original_size=list(img.original_size)) for img in images]
    return LearnState(concepts=concepts, images=records, config=config, masks=masks, fixed=fixed,
                      model=bundle.source)


def _refresh_due(cfg: LearnConfig, step: int, total: int) -> bool:
    em_step = step - cfg.warmup_steps
    return bool(cfg.refresh_every) and em_step > 0 and em_step % cfg.refresh_every == 0 and step < total


def refresh_kind(state: LearnState, total: int) -> str | None:
    """What the mask step at the top of `state.step` is: 'init' (the first estimate, once warm-up is
    over), 'refresh' (every `refresh_every` EM steps, once per step) or None."""
    cfg = state.config
    if state.step >= cfg.warmup_steps and not state.mask_history:
        return "init"
    if _refresh_due(cfg, state.step, total) and state.mask_history[-1]["step"] != state.step:
        return "refresh"
    return None


def _optimizer(vectors: torch.nn.Parameter, cfg: LearnConfig, saved: dict | None) -> torch.optim.AdamW:
    """AdamW over the token vectors, with the saved moments of a resumed run."""
    opt = torch.optim.AdamW([vectors], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        opt.state[vectors] = {
            "step": torch.tensor(float(saved["step"])),
            "exp_avg": saved["exp_avg"].clone().to(vectors.device),
            "exp_avg_sq": saved["exp_avg_sq"].clone().to(vectors.device),
        }
    return opt


class _Run:
    """The moving parts of one `learn` call: the token vectors, their optimiser and the masks at
    latent size. Each method is one named step of the loop; `learn` says in which order."""

    def __init__(self, bundle, images: list[TrainImage], state: LearnState):
        self.bundle, self.images, self.state, self.cfg = bundle, images, state, state.config
        self.token_id = dict(zip(state.concepts.names, state.concepts.token_ids(bundle)))
        self.vectors = torch.nn.Parameter(state.concepts.vectors.detach().clone().float().to(bundle.device))
        self.opt = _optimizer(self.vectors, self.cfg, state.optimizer)
        self.latent = [None if m is None or not state.mask_history else latent_masks(m, img.latent_hw)
                       for m, img in zip(state.masks, images)]

    def concepts_now(self) -> ConceptSet:
        """The concepts with the vectors as they are now (a detached copy)."""
        st = self.state
        return ConceptSet(st.concepts.names, st.concepts.init_words, self.vectors.detach().clone())

    def _fixed(self, i: int) -> dict:
        img, old = self.images[i], self.state.masks[i]
        return {n: old[img.names.index(n)] for n in self.state.fixed[i]}

    # --- E-step: the masks -----------------------------------------------------------------
    def refresh_masks(self, kind: str) -> None:
        """Re-estimates every image's masks from the current tokens and installs them."""
        t0 = time.perf_counter()
        self.install_masks(self.estimate_masks(kind), kind, t0)

    def estimate_masks(self, kind: str) -> list:
        """Each image's new masks: cross-attention over `mask_timesteps` (first estimate) or
        `refresh_timesteps` random timesteps, threshold, DenseCRF; an image whose every mask is
        fixed keeps them."""
        st, cfg = self.state, self.cfg
        gen, _ = step_rng(cfg.seed + 7919, st.step)
        concepts = self.concepts_now()
        n_timesteps = cfg.mask_timesteps if kind == "init" else cfg.refresh_timesteps
        new_masks = []
        for i, img in enumerate(self.images):
            old, fixed = st.masks[i], self._fixed(i)
            if len(fixed) == len(img.names):
                new_masks.append(old)
                continue
            masks, _ = estimate_masks(
                self.bundle, concepts, img, n_timesteps=n_timesteps, batch=cfg.mask_batch,
                threshold=cfg.threshold, use_crf=cfg.use_crf, crf_params=cfg.crf, fixed=fixed,
                generator=gen, layers=cfg.mask_layers, stratified=cfg.timestep_sampling == "stratified",
                t_range=cfg.mask_t_range, background=cfg.background,
                previous=old if kind == "refresh" else None, stickiness=cfg.mask_stickiness,
                exclusive=cfg.exclusive_masks, fill_lost=cfg.fill_lost,
                share_parts=cfg.share_parts)
            new_masks.append(masks)
        return new_masks

    def install_masks(self, new_masks: list, kind: str, started: float) -> None:
        """Makes `new_masks` the state's masks and records the refresh: each mask's change
        (1 - IoU with the one before) and the wall time since `started` (EM's cost over plain steps)."""
        st = self.state
        change = {}
        if st.mask_history:
            for i, (img, old, new) in enumerate(zip(self.images, st.masks, new_masks)):
                change[f"img{i + 1}"] = {n: 1.0 - iou(old[k], new[k]) for k, n in enumerate(img.names)}
        # Assign only once every image is done, so an interrupt never leaves half a refresh.
        st.masks = new_masks
        self.latent = [latent_masks(m, img.latent_hw) for m, img in zip(new_masks, self.images)]
        st.mask_history.append({"step": st.step, "masks": [m.clone() for m in self.latent]})
        record = {"step": st.step, "kind": kind, "source": "fresh", "change": change,
                  "seconds": round(time.perf_counter() - started, 6)}
        if kind == "refresh" and self.cfg.restart_moved > 0:
            record["restarted"] = self.restart_moved(change)
        st.history["refreshes"].append(record)

    def restart_moved(self, change: dict) -> list[str]:
        """Puts each concept whose mask moved by more than `restart_moved` back at its initial
        vector, its first moment cleared (the second kept, so its first steps are not outsized);
        the names restarted."""
        st = self.state
        moved = sorted({n for per in change.values() for n, c in per.items() if c > self.cfg.restart_moved})
        if moved:
            start = ConceptSet.create(self.bundle, st.concepts.names, st.concepts.init_words, seed=self.cfg.seed)
            moments = self.opt.state.get(self.vectors, {})
            with torch.no_grad():
                for n in moved:
                    k = st.concepts.index(n)
                    self.vectors[k] = start.vectors[k].to(self.vectors)
                    if "exp_avg" in moments:
                        moments["exp_avg"][k] = 0
            # The state too, so a run stopped before its next step resumes from the restart.
            st.concepts = ConceptSet(st.concepts.names, st.concepts.init_words, self.vectors.detach().cpu().clone())
            if st.optimizer is not None and "exp_avg" in moments:
                st.optimizer = dict(st.optimizer, exp_avg=moments["exp_avg"].detach().cpu().clone())
        return moved

    # --- the fixed-noise evaluation ------------------------------------------------------------
    def log_eval(self) -> None:
        st = self.state
        st.history["eval"].append({"step": st.step, "loss": fixed_noise_loss(self.bundle, self.images,
                                                                             self.concepts_now(), seed=self.cfg.seed)})

    # --- M-step: one token step ----------------------------------------------------------------
    def token_step(self, capture: AttentionCapture) -> dict | None:
        """One optimiser step on the token vectors; its record, or None (and the state marked
        'nan', the vectors as they were) when the loss or the vectors became non-finite."""
        st = self.state
        before = self.vectors.detach().clone()
        loss, info = concept_step_loss(self.bundle, self.images, st.concepts, self.vectors, self.latent,
                                       self.token_id, st.step, self.cfg.seed, self.cfg.flip, self.cfg.attn_weight,
                                       capture, st.step < self.cfg.warmup_steps, self.cfg.shuffle,
                                       self.cfg.step_prompt)
        if not math.isfinite(info["loss"]):
            st.status = "nan"
            st.message = f"loss was not finite at step {st.step}; kept the state of the step before"
            return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if not bool(torch.isfinite(self.vectors).all()):
            with torch.no_grad():
                self.vectors.copy_(before)
            st.status = "nan"
            st.message = f"token vectors became non-finite at step {st.step}; kept the step before"
            return None
        return info

    def commit(self, info: dict) -> None:
        """Copies the step's vectors and optimiser moments into the state and counts the step."""
        st = self.state
        st.concepts = ConceptSet(st.concepts.names, st.concepts.init_words, self.vectors.detach().cpu().clone())
        s = self.opt.state[self.vectors]
        st.optimizer = {"exp_avg": s["exp_avg"].detach().cpu().clone(),
                        "exp_avg_sq": s["exp_avg_sq"].detach().cpu().clone(), "step": int(float(s["step"]))}
        st.history["steps"].append(info)
        st.step += 1


def _check_images(images: list[TrainImage], state: LearnState) -> None:
    if len(images) != len(state.images):
        raise ValueError(f"images: the state has {len(state.images)} image(s), {len(images)} were given")
    for img, rec in zip(images, state.images):
        if img.names != rec["names"]:
            raise ValueError(f"image {rec['path']!r}: its concepts {img.names} differ from the state's {rec['names']}")


def _trainable(images: list[TrainImage]) -> None:
    """Latents made under inference mode (as ComfyUI runs nodes) cannot take part in autograd; copies can."""
    for img in images:
        if img.latent_mean.is_inference():
            img.latent_mean, img.latent_std = img.latent_mean.clone(), img.latent_std.clone()


def _trim_history(state: LearnState) -> None:
    """A resumed run keeps only the history up to the step its tensors were saved at."""
    state.history["steps"] = [h for h in state.history["steps"] if h["step"] < state.step]
    state.history["eval"] = [h for h in state.history.get("eval", []) if h["step"] < state.step]


def learn(bundle, images: list[TrainImage], state: LearnState, *, out=None, should_stop=None, on_step=None,
          progress: bool = True) -> LearnState:
    """Runs the state's remaining steps, up to `config.warmup_steps + config.steps` in all; returns
    a new state (the input is not modified). `learn_more` runs N more instead.

    Saves to `out` every `save_every` steps and at the end. Stops early, keeping the last
    good step, on a non-finite loss (status 'nan'), when `should_stop()` is true ('cancelled'),
    or on Ctrl-C ('interrupted', saved, then re-raised).
    """
    state = state.copy()
    if out is not None:
        prepare_out(out)
    _check_images(images, state)
    _trainable(images)
    _trim_history(state)
    cfg = state.config
    total = cfg.warmup_steps + cfg.steps
    state.status, state.message = "running", ""

    def save():
        if out is not None:
            save_run(state, bundle, out)

    def interrupted():
        state.status, state.message = "interrupted", f"interrupted after step {state.step}"

    with torch.inference_mode(False), torch.enable_grad(), saved_on_exit(save, interrupted):
        run = _Run(bundle, images, state)
        with tqdm(total=total, initial=min(state.step, total), disable=not progress, desc="learn", unit="step") as bar, \
                AttentionCapture(bundle.unet, cfg.loss_layers) as capture:
            while True:
                # Refreshes run at the top of a step, so a run stopped during one redoes it on resume.
                kind = refresh_kind(state, total)
                if kind is not None:
                    with torch.no_grad():
                        run.refresh_masks(kind)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step >= cfg.warmup_steps:
                    run.log_eval()
                if state.step >= total:
                    state.status = "done"
                    break
                if should_stop is not None and should_stop():
                    state.status, state.message = "cancelled", f"cancelled after step {state.step}"
                    break
                info = run.token_step(capture)
                if info is None:
                    break
                run.commit(info)
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}")
                if on_step is not None:
                    on_step(state, info)
                if out is not None and state.step % cfg.save_every == 0:
                    save_run(state, bundle, out)
    return state


# --- what the ComfyUI nodes (and any caller working step by step) need ------------------------------
def continued(state: LearnState, steps: int, **settings) -> LearnState:
    """A copy of `state` set to run `steps` more EM steps (beyond those it has done) with the given
    LearnConfig fields changed, e.g. lr, refresh_every. `learn` then runs them. What a node does
    with its input state (em_core/steps.py)."""
    state = state.copy()
    done = state.step - state.config.warmup_steps
    state.run_from = done
    state.config = dataclasses.replace(state.config, steps=done + steps, **settings)
    return state


def continue_run(state: LearnState, steps: int, what: str = "steps") -> LearnState:
    """A copy of `state` set for a command asking `steps` EM steps of it (`learn --steps` on an OUT
    that holds a run): a finished run gets `steps` more, as `continued`; an unfinished one (Ctrl-C,
    a crash, a non-finite loss) goes on to `steps` after the step it started from, so the same
    command finishes it (em_core/steps.py). `what` names the input in errors."""
    done = state.step - state.config.warmup_steps
    run_from, end = run_span(max(done, 0), state.status, state.run_from, steps, what)
    state = state.copy()
    state.run_from = run_from
    state.config = dataclasses.replace(state.config, steps=end)
    return state


def learn_more(bundle, images: list[TrainImage], state: LearnState, steps: int, *, out=None, should_stop=None,
               on_step=None, progress: bool = True, **settings) -> LearnState:
    """`steps` more EM steps on `state` (settings changed as in `continued`); `learn` with the count
    relative to where the state stands rather than the run's total."""
    return learn(bundle, images, continued(state, steps, **settings), out=out, should_stop=should_stop,
                 on_step=on_step, progress=progress)


def refine_state_masks(state: LearnState, images: list[TrainImage], params: CRFParams) -> LearnState:
    """DenseCRF on every image's masks (user-fixed masks kept as given); a new state whose mask
    history and refresh records show it as a 'crf' step."""
    _check_images(images, state)
    state = state.copy()
    for i, img in enumerate(images):
        state.masks[i] = refine_keeping(img, state.masks[i], params, set(state.fixed[i]))
    state.mask_history.append({"step": state.step, "masks": [latent_masks(m, img.latent_hw)
                                                             for m, img in zip(state.masks, images)]})
    state.history["refreshes"].append({"step": state.step, "kind": "crf", "change": {}})
    return state
