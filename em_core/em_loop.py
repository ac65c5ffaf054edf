"""The EM-like loop: optimise concept tokens under masks, re-estimate masks from attention.

Per step: one image, a random non-empty subset of its concepts ("a photo of [v1] and [v3]"),
a random timestep and noise; loss = masked diffusion loss + w * cross-attention loss; only the
concept vectors move. Every `refresh_every` steps the masks are re-estimated with the current
tokens: cross-attention averaged over random timesteps (`mask_timesteps` for the first estimate,
`refresh_timesteps` after), threshold, DenseCRF.
With mask_source 'training', refreshes after the first instead average the maps the token steps
since the last refresh computed anyway for the attention loss, from the steps whose prompt named
all of the image's concepts, so EM costs only the CRF on top of plain steps (an image no such
step drew since the last refresh gets a fresh estimate); on the tiny world these masks are worse.
"""
from __future__ import annotations

import contextlib
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
from .dataset import TrainImage
from .crf import refine_masks
from .masks import estimate_masks, iou, latent_masks, masks_from_maps, restore_fixed
from .state import LearnState
from .eval_loss import fixed_noise_loss
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


class _Run:
    def __init__(self, bundle, images: list[TrainImage], state: LearnState):
        self.bundle, self.images, self.state, self.cfg = bundle, images, state, state.config
        self.token_id = dict(zip(state.concepts.names, state.concepts.token_ids(bundle)))
        dev = bundle.device
        self.vectors = torch.nn.Parameter(state.concepts.vectors.detach().clone().float().to(dev))
        self.opt = torch.optim.AdamW([self.vectors], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state.optimizer is not None:
            self.opt.state[self.vectors] = {
                "step": torch.tensor(float(state.optimizer["step"])),
                "exp_avg": state.optimizer["exp_avg"].clone().to(dev),
                "exp_avg_sq": state.optimizer["exp_avg_sq"].clone().to(dev),
            }
        self.latent = [None if m is None or not state.mask_history else latent_masks(m, img.latent_hw)
                       for m, img in zip(state.masks, images)]
        if not state.map_sums:
            self.reset_maps()
        self.pending = None  # the current step's maps, added to the sums when the step commits
        self.pool, self.jobs = None, None  # the DenseCRF worker of an overlapped refresh

    def reset_maps(self) -> None:
        n = len(self.images)
        self.state.map_sums, self.state.map_counts = [None] * n, [None] * n

    def collect(self, i: int, idx: list, maps: torch.Tensor) -> None:
        # Only steps whose prompt named all of the image's concepts: a token alone in its prompt
        # takes attention from everywhere, so subset maps are too broad to compete with the others.
        if len(idx) == len(self.images[i].names):
            self.pending = (i, idx, maps.float().cpu())

    def _training_masks(self, i: int, img, fixed: dict, use_crf: bool) -> np.ndarray:
        """A refresh from the full-prompt maps the steps since the last refresh captured."""
        st, cfg = self.state, self.cfg
        sums, counts = st.map_sums[i], st.map_counts[i]
        return masks_from_maps(img, sums / counts.clamp_min(1)[:, None, None], threshold=cfg.threshold,
                               use_crf=use_crf, crf_params=cfg.crf, fixed=fixed, background=cfg.background)

    def _fixed(self, i: int) -> dict:
        img, old = self.images[i], self.state.masks[i]
        return {n: old[img.names.index(n)] for n in self.state.fixed[i]}

    # --- masks -------------------------------------------------------------------------
    def refresh_masks(self, kind: str) -> None:
        st, cfg = self.state, self.cfg
        if st.pending_refresh is not None:  # a CRF overlap as long as the refresh interval
            self.finish_crf()
        t0 = time.perf_counter()
        gen, _ = step_rng(cfg.seed + 7919, st.step)
        concepts = ConceptSet(st.concepts.names, st.concepts.init_words, self.vectors.detach().clone())
        source = "fresh" if kind == "init" or cfg.mask_source == "fresh" else "training"
        overlap = cfg.use_crf and cfg.crf_overlap > 0 and kind == "refresh"
        n_timesteps = cfg.mask_timesteps if kind == "init" else cfg.refresh_timesteps
        new_masks, fallback = [], []
        for i, img in enumerate(self.images):
            old, fixed = st.masks[i], self._fixed(i)
            if len(fixed) == len(img.names):
                masks = None if overlap else old
            elif source == "training" and st.map_sums[i] is not None:
                masks = self._training_masks(i, img, fixed, cfg.use_crf and not overlap)
            else:
                if source == "training":  # no step drew all of this image's concepts since the last refresh
                    fallback.append(i + 1)
                masks, _ = estimate_masks(
                    self.bundle, concepts, img, n_timesteps=n_timesteps, batch=cfg.mask_batch,
                    threshold=cfg.threshold, use_crf=cfg.use_crf and not overlap, crf_params=cfg.crf, fixed=fixed,
                    generator=gen, layers=cfg.mask_layers, stratified=cfg.timestep_sampling == "stratified",
                    t_range=cfg.mask_t_range, background=cfg.background)
            new_masks.append(masks)
        self.reset_maps()
        if overlap:
            st.pending_refresh = {"step": st.step, "apply_at": st.step + cfg.crf_overlap, "kind": kind,
                                  "source": source, "fresh_images": fallback, "masks": new_masks}
            self._submit_crf()
            st.pending_refresh["seconds"] = time.perf_counter() - t0
            return
        self._apply(new_masks, kind, source, st.step, fallback, t0)

    def _apply(self, new_masks: list, kind: str, source: str, step: int, fallback: list, started: float,
               earlier: float = 0.0) -> None:
        """Installs a refresh's masks. Its record's `seconds` is the wall time the loop spent on the
        refresh (EM's cost over plain steps): `earlier` seconds plus those since `started`."""
        st = self.state
        change = {}
        if st.mask_history:
            for i, (img, old, new) in enumerate(zip(self.images, st.masks, new_masks)):
                change[f"img{i + 1}"] = {n: 1.0 - iou(old[k], new[k]) for k, n in enumerate(img.names)}
        # Assign only once every image is done, so an interrupt never leaves half a refresh.
        st.masks = new_masks
        self.latent = [latent_masks(m, img.latent_hw) for m, img in zip(new_masks, self.images)]
        st.mask_history.append({"step": st.step, "masks": [m.clone() for m in self.latent]})
        record = {"step": step, "kind": kind, "source": source, "change": change}
        if fallback:
            record["fresh_images"] = fallback
        if step != st.step:
            record["applied_at"] = st.step
        record["seconds"] = round(earlier + time.perf_counter() - started, 6)
        st.history["refreshes"].append(record)

    # --- DenseCRF beside the token steps ------------------------------------------------
    def _submit_crf(self) -> None:
        """Starts the pending refresh's DenseCRF jobs in a worker process."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self.jobs = [None if m is None else self.pool.submit(refine_masks, img.rgb, m, self.cfg.crf, img.names)
                     for img, m in zip(self.images, self.state.pending_refresh["masks"])]

    def finish_crf(self) -> None:
        """Waits for the pending refresh (or, after a resume, runs its DenseCRF here) and applies it."""
        p = self.state.pending_refresh
        t0 = time.perf_counter()
        jobs = self.jobs or [None if m is None else False for m in p["masks"]]
        new_masks = []
        for i, (img, pre, job) in enumerate(zip(self.images, p["masks"], jobs)):
            if pre is None:
                new_masks.append(self.state.masks[i])
                continue
            refined = job.result() if job else refine_masks(img.rgb, pre, self.cfg.crf, img.names)
            new_masks.append(restore_fixed(img.names, refined, pre, self._fixed(i)))
        self.jobs = None
        self.state.pending_refresh = None
        self._apply(new_masks, p["kind"], p["source"], p["step"], p.get("fresh_images", []), t0,
                    p.get("seconds", 0.0))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def step_loss(self, warmup: bool, capture: AttentionCapture) -> tuple[torch.Tensor, dict]:
        self.pending = None
        wants = self.cfg.refresh_every and self.cfg.mask_source == "training"
        return concept_step_loss(self.bundle, self.images, self.state.concepts, self.vectors, self.latent,
                                 self.token_id, self.state.step, self.cfg.seed, self.cfg.flip,
                                 self.cfg.attn_weight, capture, warmup, on_maps=self.collect if wants else None)

    def commit(self, info: dict) -> None:
        st = self.state
        st.concepts = ConceptSet(st.concepts.names, st.concepts.init_words, self.vectors.detach().cpu().clone())
        s = self.opt.state[self.vectors]
        st.optimizer = {"exp_avg": s["exp_avg"].detach().cpu().clone(),
                        "exp_avg_sq": s["exp_avg_sq"].detach().cpu().clone(), "step": int(float(s["step"]))}
        st.history["steps"].append(info)
        st.step += 1
        if self.pending is not None:
            i, idx, maps = self.pending
            if st.map_sums[i] is None:
                k = len(self.images[i].names)
                st.map_sums[i], st.map_counts[i] = torch.zeros(k, *maps.shape[1:]), torch.zeros(k)
            st.map_sums[i][idx] += maps
            st.map_counts[i][idx] += 1
            self.pending = None


def learn(bundle, images: list[TrainImage], state: LearnState, *, out=None, should_stop=None, on_step=None,
          progress: bool = True) -> LearnState:
    """Runs the state's remaining steps; returns a new state (the input is not modified).

    Saves to `out` every `save_every` steps and at the end. Stops early, keeping the last
    good step, on a non-finite loss (status 'nan'), when `should_stop()` is true ('cancelled'),
    or on Ctrl-C ('interrupted', saved, then re-raised).
    """
    state = state.copy()
    if out is not None:
        prepare_out(out)
    if len(images) != len(state.images):
        raise ValueError(f"images: the state has {len(state.images)} image(s), {len(images)} were given")
    for img, rec in zip(images, state.images):
        if img.names != rec["names"]:
            raise ValueError(f"image {rec['path']!r}: its concepts {img.names} differ from the state's {rec['names']}")
        if img.latent_mean.is_inference():
            img.latent_mean, img.latent_std = img.latent_mean.clone(), img.latent_std.clone()
    # A resumed run keeps only the history up to the step its tensors were saved at.
    state.history["steps"] = [h for h in state.history["steps"] if h["step"] < state.step]
    state.history["eval"] = [h for h in state.history.get("eval", []) if h["step"] < state.step]
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
                AttentionCapture(bundle.unet, cfg.loss_layers) as capture, contextlib.closing(run):
            while True:
                pending = state.pending_refresh
                if pending is not None and state.step >= min(pending["apply_at"], total):
                    run.finish_crf()
                # Refreshes run at the top of a step, so a run stopped during one redoes it on resume.
                if state.step >= cfg.warmup_steps and not state.mask_history:
                    with torch.no_grad():
                        run.refresh_masks("init")
                elif (_refresh_due(cfg, state.step, total) and state.mask_history[-1]["step"] != state.step
                      and not (pending is not None and pending["step"] == state.step)):
                    with torch.no_grad():
                        run.refresh_masks("refresh")
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step >= cfg.warmup_steps:
                    concepts = ConceptSet(state.concepts.names, state.concepts.init_words, run.vectors.detach().clone())
                    state.history["eval"].append(
                        {"step": state.step, "loss": fixed_noise_loss(bundle, images, concepts, seed=cfg.seed)})
                if state.step >= total:
                    state.status = "done"
                    break
                if should_stop is not None and should_stop():
                    state.status, state.message = "cancelled", f"cancelled after step {state.step}"
                    break
                warm = state.step < cfg.warmup_steps
                before = run.vectors.detach().clone()
                loss, info = run.step_loss(warm, capture)
                if not math.isfinite(info["loss"]):
                    state.status = "nan"
                    state.message = f"loss was not finite at step {state.step}; kept the state of the step before"
                    break
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                run.opt.step()
                if not bool(torch.isfinite(run.vectors).all()):
                    with torch.no_grad():
                        run.vectors.copy_(before)
                    state.status = "nan"
                    state.message = f"token vectors became non-finite at step {state.step}; kept the step before"
                    break
                run.commit(info)
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}")
                if on_step is not None:
                    on_step(state, info)
                if out is not None and state.step % cfg.save_every == 0:
                    save_run(state, bundle, out)
    return state
