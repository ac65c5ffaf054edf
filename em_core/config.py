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
    # Timesteps of each later refresh with mask_source 'fresh'. 30 stratified timesteps estimate the
    # averaged map as closely as the paper's 50 independent ones (benchmarks/mask_estimate_error.py)
    # at 60% of the U-Net passes.
    refresh_timesteps: int = 30
    # 'stratified': one random timestep in each of N equal slices of the schedule; 'uniform': N
    # independent draws (what the paper describes, and what runs saved before this setting used).
    timestep_sampling: str = "stratified"
    # Where refreshes get their maps: 'fresh' (the paper's E-step) runs new U-Net calls over
    # `refresh_timesteps` random timesteps with the full prompt; 'training' averages the maps the token
    # steps since the last refresh already computed for the attention loss, from steps whose prompt
    # named all of the image's concepts: no extra U-Net calls, but fewer and noisier maps, and
    # measurably worse masks on the tiny world (docs/tiny_world_eval/report.md).
    mask_source: str = "fresh"
    mask_batch: int = 10  # timesteps per U-Net call when estimating masks
    threshold: float = 0.5
    # Steps the token loop goes on with the old masks while a refresh's DenseCRF runs in a worker
    # process (it holds the GIL, so a thread cannot overlap it); 0: refine in place. Helps where
    # the U-Net leaves a CPU core idle, as on a GPU.
    crf_overlap: int = 0
    use_crf: bool = True
    crf: CRFParams = field(default_factory=CRFParams)
    warmup_steps: int = 0  # plain textual inversion without masks, before the first mask estimate
    flip: bool = True
    layers: str = "coarse"  # 'coarse' (16x16 for SD at 512 px) or 'all'
    resolution: int | None = None  # working side in pixels; None: the model's own
    seed: int = 0
    save_every: int = 50

    def __post_init__(self):
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
            "mask_source": self.mask_source in ("training", "fresh"), "crf_overlap": self.crf_overlap >= 0,
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
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        # A run saved before these settings existed goes on as it began.
        kw.setdefault("refresh_timesteps", kw.get("mask_timesteps", cls.mask_timesteps))
        kw.setdefault("timestep_sampling", "uniform")
        return cls(**kw)
