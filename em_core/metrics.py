"""Mask quality against known masks: the IoU per concept at every mask refresh (paper Fig. 3)."""
from __future__ import annotations

import itertools

import numpy as np

from .masks import iou, latent_masks


def iou_curve(state, truth: dict, groups=None) -> list[dict]:
    """[{step, iou: {imgI: {name: IoU}}}] for each refresh in the state's mask history.

    `truth` maps (image index, name) -> bool mask at the image's working size; the
    comparison is made on the latent grid the masks live on, the truth brought to it as the
    masks are (`latent_masks`: nearest, as Break-A-Scene). `groups`: lists of names nothing
    tells apart (one init word for two objects, or random init); within each, masks are
    scored under the matching of names to true masks that scores best (see `matched`).
    """
    curve = []
    for entry in state.mask_history:
        scores = {f"img{i + 1}": matched(*_est_ref(state, entry, truth, i), groups or [])
                  for i in sorted({i for i, _ in truth})}
        curve.append({"step": entry["step"], "iou": scores})
    return curve


def final_matching(state, truth: dict, groups=None, image: int = 0) -> dict:
    """name -> the true name its last mask is scored against (`best_matching`): a concept read back
    from generated images is judged against the object its mask ended on, as its IoU is."""
    return best_matching(*_est_ref(state, state.mask_history[-1], truth, image), groups or [])


def _est_ref(state, entry: dict, truth: dict, i: int) -> tuple[dict, dict]:
    """Image i's estimated masks (one history entry) and true masks, on the latent grid, by name."""
    names = state.images[i]["names"]
    est, ref = {}, {}
    for (j, name), true in truth.items():
        if j != i:
            continue
        if name not in names:
            raise KeyError(f"truth: {name} is not a concept of image {i + 1} ({names})")
        est[name] = entry["masks"][i][names.index(name)].numpy() > 0.5
        ref[name] = latent_masks(np.asarray(true)[None], est[name].shape)[0].numpy() > 0.5
    return est, ref


def mean_iou_curve(state, truth: dict, groups=None, image: int = 0) -> list[tuple[int, float]]:
    """[(step, mean IoU over one image's concepts)] for each refresh: `iou_curve` of that image,
    averaged over its concepts (what the evaluation and the benchmarks plot and compare)."""
    key = f"img{image + 1}"
    return [(c["step"], float(np.mean(list(c["iou"][key].values())))) for c in iou_curve(state, truth, groups)]


def matched(est: dict, ref: dict, groups) -> dict:
    """IoU per name; within each group of interchangeable names, under the best one-to-one
    assignment of the group's estimated masks to its true masks (highest mean IoU)."""
    match = best_matching(est, ref, groups)
    return {n: iou(est[n], ref[match[n]]) for n in ref}


def best_matching(est: dict, ref: dict, groups) -> dict:
    """name -> true name: itself, or within a group of interchangeable names the one-to-one assignment
    of estimated to true masks with the highest total IoU."""
    out = {n: n for n in ref}
    for group in groups:
        group = [n for n in group if n in ref]
        best = max(itertools.permutations(group),
                   key=lambda perm: sum(iou(est[a], ref[b]) for a, b in zip(group, perm)), default=())
        out.update(zip(group, best))
    return out


def mean_iou(entry: dict) -> float:
    values = [v for per in entry["iou"].values() for v in per.values()]
    return float(np.mean(values)) if values else float("nan")


def attention_like(mask: np.ndarray, rng: np.random.Generator, grid: int = 16, blur: float = 1.0,
                   noise: float = 0.05, threshold: float = 0.25) -> np.ndarray:
    """A coarse mask shaped like a thresholded attention map: `mask` reduced to grid x grid,
    blurred, with noise, blown back up and thresholded low so that it spills over the edges.
    The stand-in for a real model's attention when measuring DenseCRF against human masks.
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    h, w = mask.shape
    small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((grid, grid), Image.BOX),
                       np.float32) / 255
    small = gaussian_filter(small, blur) + rng.normal(0, noise, small.shape)
    big = Image.fromarray(np.clip(small * 255, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(big, np.float32) / 255 > threshold


NO_WEIGHTS = ("{what} needs local weights: pass {flag}=FOLDER, a folder with a transformers {kind} saved by "
              "save_pretrained (nothing is downloaded)")


def _require(path, what, flag, kind):
    from pathlib import Path

    if not path:
        raise ValueError(NO_WEIGHTS.format(what=what, flag=flag, kind=kind))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag}: {path} is not a folder")
    return Path(path)


def _pixels(images, size: int, mean, std):
    """Images as a normalised (N, 3, size, size) batch, squash-resized. Only LPIPS uses it (its nets
    take [-1, 1] images at their own size); the CLIP and feature metrics use transformers' image
    processors (`clip_processor`, `feature_processor`)."""
    import torch

    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def clip_processor(size: int):
    """CLIP's own image preprocessing (transformers' CLIPImageProcessor with its defaults: shorter
    side to `size` bicubic, centre crop, CLIP's mean and std), built in code so nothing is read or
    downloaded. The PIL backend where transformers has several, so results need no torchvision."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor  # PIL-based before 5
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def clip_image_similarity(generated, references, clip_dir) -> float:
    """Mean cosine similarity of CLIP image embeddings, each generated image against each reference."""
    import torch
    from transformers import CLIPModel

    path = _require(clip_dir, "CLIP image similarity", "clip_dir", "CLIPModel")
    model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    processor = clip_processor(model.config.vision_config.image_size)
    with torch.no_grad():
        def embed(imgs):
            pixels = processor(images=list(imgs), return_tensors="pt").pixel_values
            out = model.get_image_features(pixel_values=pixels)
            feats = out if torch.is_tensor(out) else out.pooler_output
            return torch.nn.functional.normalize(feats, dim=-1)

        return float((embed(generated) @ embed(references).T).mean())


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def feature_processor(backbone_dir, size: int):
    """The image preprocessing for a vision backbone: its own, read from its folder only, where the
    folder holds one (preprocessor_config.json, as `save_pretrained` of a transformers image
    processor writes it, e.g. DINOv2's resize and centre crop); else one built in code, a bicubic
    resize to `size` x `size` with ImageNet's mean and std (transformers' ViTImageProcessor, the PIL
    backend where transformers has several). Nothing is downloaded either way."""
    from pathlib import Path

    from transformers import AutoImageProcessor

    if (Path(backbone_dir) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(backbone_dir, local_files_only=True)
    try:
        from transformers import ViTImageProcessorPil as Processor  # transformers 5
    except ImportError:
        from transformers import ViTImageProcessor as Processor  # PIL-based before 5
    from PIL import Image

    return Processor(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def feature_cosine_similarity(generated, references, backbone_dir) -> float:
    """Mean cosine similarity of a vision backbone's pooled features (e.g. a local DINOv2 or CLIP
    vision), each image preprocessed as `feature_processor` says."""
    import torch
    from transformers import AutoConfig, AutoModel

    path = _require(backbone_dir, "feature cosine similarity", "backbone_dir", "vision model")
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    vision = getattr(cfg, "vision_config", cfg)
    size = getattr(vision, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    processor = feature_processor(path, size)
    with torch.no_grad():
        def feats(imgs):
            x = processor(images=[im.convert("RGB") for im in imgs], return_tensors="pt").pixel_values
            out = model.vision_model(pixel_values=x) if hasattr(model, "vision_model") else model(pixel_values=x)
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else \
                out.last_hidden_state.mean(1)
            return torch.nn.functional.normalize(pooled, dim=-1)

        return float((feats(generated) @ feats(references).T).mean())


def lpips_diversity(images, lpips_net=None) -> float:
    """Mean LPIPS distance over all pairs of images made from one prompt (higher: more diverse).

    `lpips_net` is a callable (x, y) -> distance on [-1, 1] images, e.g. `lpips.LPIPS(net='alex')`
    built from weights the user has locally; none ships here, so without one this says so.
    """
    import itertools

    import torch

    if lpips_net is None:
        raise ValueError("LPIPS diversity needs an LPIPS network built from local weights (the `lpips` package "
                         "with its AlexNet/VGG weights on disk); pass it as lpips_net")
    if len(images) < 2:
        raise ValueError("LPIPS diversity needs at least two images of the same prompt")
    x = _pixels(images, images[0].size[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        d = [float(lpips_net(x[i:i + 1], x[j:j + 1]).mean()) for i, j in itertools.combinations(range(len(x)), 2)]
    return float(np.mean(d))
