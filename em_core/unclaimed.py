"""Lost concepts and the regions nobody claims (an option of the mask estimate, issue 14).

Every concept a prompt names is in its image, so a concept whose estimate comes out (nearly)
empty and an object-sized region that no concept claims are one error seen twice: the concept's
map peaked on another concept's object, lost it there, and the object it stands for went to
nobody. Measured on the research world: a concept so lost is never found again, since its token
is then trained on an empty mask (research/tiny_world_binding/NOTES.md).
"""
from __future__ import annotations

import numpy as np

MIN_AREA = 0.01  # of the image: below it a mask counts as lost, and a free region as a sliver


def components(region: np.ndarray) -> np.ndarray:
    """Labels (H, W) of the 4-connected parts of a bool region, 1.. (0 outside). numpy has no
    labelling and scipy is not a dependency: union-find over each row's runs, so the cost follows
    the number of runs, not the parts' shapes."""
    h, w = region.shape
    edges = np.diff(np.pad(region, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rs, ss = np.nonzero(edges == 1)
    es = np.nonzero(edges == -1)[1]  # same row-major order as the starts: one end per start
    parent = list(range(len(rs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(rs, np.arange(h + 1))
    for r in range(1, h):
        i, i_end = row_start[r - 1], row_start[r]  # runs of the row above
        j, j_end = row_start[r], row_start[r + 1]
        while i < i_end and j < j_end:
            if ss[i] < es[j] and ss[j] < es[i]:  # the runs share a column
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if es[i] < es[j]:
                i += 1
            else:
                j += 1
    roots = [root(i) for i in range(len(rs))]
    ids = {v: n + 1 for n, v in enumerate(sorted(set(roots)))}
    out = np.zeros((h, w), dtype=np.int64)
    for r, s_, e, v in zip(rs, ss, es, roots):
        out[r, s_:e] = ids[v]
    return out


def lost_rows(masks: np.ndarray, attention: np.ndarray, rows: list[int], min_area: float) -> list[int]:
    """The rows of `rows` whose masks are under `min_area` of the image, the most attended first
    (the order in which they choose)."""
    n = masks.shape[1] * masks.shape[2]
    return sorted((k for k in rows if masks[k].sum() < min_area * n), key=lambda k: -float(attention[k].max()))


def give_unclaimed(masks: np.ndarray, attention: np.ndarray, rows: list[int],
                   min_area: float = MIN_AREA) -> tuple[np.ndarray, list[int]]:
    """Each concept of `rows` whose mask is under `min_area` of the image takes a part of the
    unclaimed pixels (4-connected, at least `min_area`): the part its raw map (`attention`, K x H x W
    at image size) covers most on average; the most attended concept chooses first. Returns the
    masks and the rows that took a part."""
    masks = masks.copy()
    n = masks.shape[1] * masks.shape[2]
    lost = lost_rows(masks, attention, rows, min_area)
    if not lost:
        return masks, []
    lab = components(~masks.any(0))
    parts = [p for p in range(1, int(lab.max()) + 1) if (lab == p).sum() >= min_area * n]
    took = []
    for k in lost:
        if not parts:
            break
        best = max(parts, key=lambda p: float(attention[k][lab == p].mean()))
        parts.remove(best)
        masks[k] = lab == best
        took.append(k)
    return masks, took


def give_parts(masks: np.ndarray, attention: np.ndarray, rows: list[int],
               min_area: float = MIN_AREA) -> tuple[np.ndarray, list[int]]:
    """Each concept of `rows` still under `min_area` takes the part of another concept's mask where
    its own share of the two raw maps is highest: within that mask, its share a_k / (a_k + a_j)
    rescaled to [0, 1] and cut at 0.5. Of the concepts whose masks so split into two object-sized
    parts, the one whose part its raw map covers most on average gives. Two tokens from one word,
    or a token whose word the model does not know, otherwise leave one mask over two objects (or
    the background over an object) and the other concept empty for good, trained on nothing.
    Returns the masks and the rows that took a part."""
    masks = masks.copy()
    n = masks.shape[1] * masks.shape[2]
    took = []
    for k in lost_rows(masks, attention, rows, min_area):
        spare = []  # (owner, part)
        for j in rows:
            if j == k or j in took or masks[j].sum() < 2 * min_area * n:
                continue
            share = attention[k] / np.maximum(attention[k] + attention[j], 1e-12)
            lo, hi = share[masks[j]].min(), share[masks[j]].max()
            if hi - lo < 1e-6:
                continue
            part = masks[j] & ((share - lo) / (hi - lo) > 0.5)
            if part.sum() >= min_area * n and (masks[j] & ~part).sum() >= min_area * n:
                spare.append((j, part))
        if not spare:
            continue
        j, part = max(spare, key=lambda s: float(attention[k][s[1]].mean()))
        masks[j] &= ~part
        masks[k] = part
        took.append(k)
    return masks, took
