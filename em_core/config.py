"""Settings of a learning run; defaults are Break-A-Scene's stage 1 and the paper's."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .crf import CRFParams


@dataclass
class LearnConfig:
    steps: int = 400  # EM token steps (warm-up not counted)
    lr: float = 5e-4
    weight_decay: float = 1e-2  # AdamW's default, as in Break-A-Scene
    attn_weight: float = 1e-2
    refresh_every: int = 50  # re-estimate masks every this many EM steps (0: never)
    mask_timesteps: int = 50  # timesteps of the first estimate (the paper's 50)
    # Timesteps of each later refresh. 30 stratified timesteps estimate the averaged map with a fifth of
    # the error of the paper's 50 independent ones (benchmarks/mask_estimate_error.py) at 60% of the
    # U-Net passes; fewer cost EM's final masks a little on both tiny worlds (docs/deviations.md).
    refresh_timesteps: int = 30
    # 'stratified': one random timestep in each of N equal slices of the schedule; 'uniform': N
    # independent draws (what the paper describes, and what runs saved before this setting used).
    timestep_sampling: str = "stratified"
    mask_batch: int = 10  # timesteps per U-Net call when estimating masks
    threshold: float = 0.5
    use_crf: bool = True
    crf: CRFParams = field(default_factory=CRFParams)
    warmup_steps: int = 0  # plain textual inversion without masks, before the first mask estimate
    flip: bool = True
    # Layers whose maps make the masks: 'all' cross-attention layers, each resized to the finest
    # captured size and averaged (the paper, section 3), or 'coarse'.
    mask_layers: str = "all"
    # Layers the attention loss reads: 'coarse' = the down/up layers at their coarsest size, 16x16
    # for SD at 512 px (Break-A-Scene's), or 'all'.
    loss_layers: str = "coarse"
    # A concept that is the scene's background (e.g. '[v3]' in "[v1] and [v2] on [v3]"): its mask
    # is what no other concept's thresholded map claims, not its own map (a background word's
    # map tends to peak on the objects). None: every concept from its own map (the paper).
    background: str | None = None
    # Timesteps of mask estimates are drawn from [lo, hi) of the training schedule; None: all of it
    # (the paper). Above t=700 the maps of small models are diffuse.
    mask_t_range: tuple | None = None
    # Weight of a refresh's previous masks in the score it thresholds (masks.binarise): 0 (the
    # paper) takes each refresh's maps alone.
    mask_stickiness: float = 0.0
    # A pixel claimed by several thresholded maps goes to the concept it attends to most (raw maps),
    # and a concept that loses most of its mask thresholds its map again where no other concept is
    # (masks.claim_exclusively).
    # False: each map thresholded on its own and DenseCRF settles overlaps (the paper).
    exclusive_masks: bool = False
    # After the CRF, a concept whose mask is under 1% of the image takes the object-sized region
    # (4-connected, >= 1%) no concept claims that its raw map covers most (unclaimed.give_unclaimed):
    # every concept the prompt names is in the image. False: such a concept keeps its few pixels.
    fill_lost: bool = False
    # After that, a concept still under 1% takes the part of another concept's mask where its share
    # of the two raw maps is highest, if both parts are object-sized (unclaimed.give_parts): one
    # token's mask over two objects and another token's empty. False: the empty concept stays empty.
    share_parts: bool = False
    # At a refresh, a concept whose mask moved (1 - IoU with its mask before above this, on any
    # image) starts again from its initial vector with its momentum cleared: what it learned was
    # learned from the wrong pixels. 0: never (the paper: tokens carry on).
    restart_moved: float = 0.0
    # Each step's prompt lists its drawn concepts in a random order (Break-A-Scene); False: in the
    # image prompt's order, the order the mask estimates read them in.
    shuffle: bool = True
    # Each step's prompt wording: "bas" ("a photo of [v1] and [v3]", Break-A-Scene) or "image" (the image
    # prompt's own words with the concepts not drawn cut out, in its order: step_prompt.py).
    step_prompt: str = "bas"
    # Every this many steps, the loss on fixed noise and timesteps (the same each time) is logged
    # beside the training loss, so the curve shows learning rather than the draws. 0: never.
    eval_every: int = 0
    resolution: int | None = None  # working side in pixels; None: the model's own
    seed: int = 0
    save_every: int = 50

    def __post_init__(self):
        if self.mask_t_range is not None:
            self.mask_t_range = tuple(int(v) for v in self.mask_t_range)
        if isinstance(self.crf, dict):
            self.crf = CRFParams(**self.crf)
        checks = {
            "steps": self.steps >= 0, "lr": self.lr > 0, "attn_weight": self.attn_weight >= 0,
            "refresh_every": self.refresh_every >= 0, "mask_timesteps": self.mask_timesteps >= 1,
            "refresh_timesteps": self.refresh_timesteps >= 1,
            "timestep_sampling": self.timestep_sampling in ("stratified", "uniform"),
            "mask_batch": self.mask_batch >= 1, "threshold": 0.0 <= self.threshold < 1.0,
            "warmup_steps": self.warmup_steps >= 0, "save_every": self.save_every >= 1,
            "resolution": self.resolution is None or self.resolution >= 8,
            "mask_layers": self.mask_layers in ("coarse", "all"), "loss_layers": self.loss_layers in ("coarse", "all"),
            "mask_t_range": self.mask_t_range is None or (len(self.mask_t_range) == 2
                                                          and 0 <= self.mask_t_range[0] < self.mask_t_range[1]),
            "eval_every": self.eval_every >= 0, "mask_stickiness": 0.0 <= self.mask_stickiness < 1.0,
            "restart_moved": 0.0 <= self.restart_moved < 1.0, "step_prompt": self.step_prompt in ("bas", "image"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"settings out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crf"] = self.crf.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LearnConfig":
        """The settings saved in a state or concept file. Settings since removed are dropped
        (`removed_settings` tells whether a saved run used one)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        # A run saved before these settings existed goes on as it began.
        kw.setdefault("refresh_timesteps", kw.get("mask_timesteps", cls.mask_timesteps))
        kw.setdefault("timestep_sampling", "uniform")
        if "layers" in d:  # one setting drove both before they were split
            kw.setdefault("mask_layers", d["layers"])
            kw.setdefault("loss_layers", d["layers"])
        return cls(**kw)


# Settings removed in issue 18, and the value that meant "off" (what every run has now).
REMOVED = {"mask_source": "fresh", "crf_overlap": 0}


def removed_settings(d: dict) -> list[str]:
    """The removed settings a saved config used with another value than the one every run has now:
    such a run cannot go on as it began."""
    return [f"{k}={d[k]!r}" for k, off in REMOVED.items() if k in d and d[k] != off]
