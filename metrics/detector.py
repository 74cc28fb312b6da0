"""The ShapesWorld detector (the scorer of ShapesEval), exactly as the spec's "Detector" section.

1. foreground = Euclidean RGB distance to white > 60; each foreground pixel takes the nearest palette
   colour;
2. 4-connected components per colour; components under 20 pixels are dropped;
3. cell = the 3x3 cell (float bounds) containing the component's centroid;
4. shape from the bounding box: fill > 0.90 square, 0.68..0.90 circle, below 0.68 triangle when the
   widest row lies in the lower third of the box, otherwise diamond;
5. the detected scene is the set of ``(colour, shape, cell)``.

Pure numpy (scipy is not a dependency): components are found on horizontal runs, which are few for
flat shapes, with a small union-find over vertically touching runs.
"""

from __future__ import annotations

import numpy as np

from datamodules.shapes_world import COLOUR_KEYS, COLOURS, Scene, cell_of_point, scene_triples

Triple = tuple[str, str, tuple[int, int]]

FOREGROUND_DISTANCE = 60.0  # RGB distance to white above which a pixel is foreground
MIN_COMPONENT_PIXELS = 20  # smaller components are noise
SQUARE_FILL = 0.90  # fill ratio strictly above -> square
CIRCLE_FILL = 0.68  # fill ratio in [0.68, 0.90] -> circle; below -> triangle or diamond

_PALETTE = np.array([COLOURS[k].rgb for k in COLOUR_KEYS], dtype=np.int32)  # [6, 3]
_PALETTE_NORM2 = (_PALETTE.astype(np.int64) ** 2).sum(axis=1)  # [6]


def _find(parent: list[int], i: int) -> int:
    # Path halving keeps the trees flat without recursion.
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _components(label: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels; returns int [H, W] ids, -1 for background.

    Pixels are grouped into horizontal runs of one label (numpy), vertically touching runs of the same
    label are unioned (a Python loop over distinct run pairs, not over pixels).
    """
    h, w = label.shape
    fg = label >= 0
    start = fg.copy()
    start[:, 1:] &= label[:, 1:] != label[:, :-1]  # a run starts where the label changes
    run = np.cumsum(start.ravel()).reshape(h, w) - 1  # run id of every foreground pixel
    n_runs = int(run[-1, -1]) + 1 if start.any() else 0
    comp = np.full((h, w), -1, dtype=np.int64)
    if n_runs == 0:
        return comp
    touch = fg[:-1] & (label[:-1] == label[1:])  # same label vertically => same component
    parent = list(range(n_runs))
    if touch.any():
        pairs = np.unique(run[:-1][touch] * n_runs + run[1:][touch])
        for a, b in zip((pairs // n_runs).tolist(), (pairs % n_runs).tolist(), strict=True):
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((_find(parent, i) for i in range(n_runs)), dtype=np.int64, count=n_runs)
    comp[fg] = roots[run[fg]]
    return comp


def _classify(ys: np.ndarray, xs: np.ndarray) -> str:
    """Shape key of one component from its bounding-box fill ratio and widest row."""
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    fill = ys.size / (bh * bw)
    if fill > SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    # Widest row = the topmost row with the most pixels (ties go up, i.e. away from "triangle"); it
    # lies in the lower third when its index r satisfies r >= 2/3 * box height (integer-exact test).
    widest = int(np.argmax(np.bincount(ys - y0, minlength=bh)))
    return "triangle" if 3 * widest >= 2 * bh else "diamond"


def detect(image: np.ndarray) -> frozenset[Triple]:
    """Detect the ShapesWorld scene in ``image`` (uint8 [H, W, 3], row first).

    Returns the set of ``(colour key, shape key, (row, col))``. The centroid is taken in continuous
    coordinates (pixel centres at +0.5, as the spec's shape masks) and mapped to a cell with the float
    bounds ``[r*H/3, (r+1)*H/3)``. Palette ties go to the earlier colour in the palette order.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
    px = img[..., :3].astype(np.int32)
    h, w = px.shape[:2]
    d = 255 - px
    dist2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]  # exact integers
    fg = dist2 > int(FOREGROUND_DISTANCE**2)  # 60^2 = 3600: "exceeds 60" is strict
    if not fg.any():
        return frozenset()
    fg_px = px[fg]  # [N, 3]
    # argmin_c |p - c|^2 = argmin_c (|c|^2 - 2 p.c): one small integer matmul instead of an [N, 6, 3]
    # broadcast; exact in int64, so ties still go to the earlier palette colour.
    nearest = (_PALETTE_NORM2 - 2 * fg_px.astype(np.int64) @ _PALETTE.T.astype(np.int64)).argmin(axis=1)
    label = np.full((h, w), -1, dtype=np.int64)
    label[fg] = nearest
    comp = _components(label)

    ys_all, xs_all = np.nonzero(fg)
    ids = comp[ys_all, xs_all]
    sizes = np.bincount(ids)
    found: set[Triple] = set()
    for cid in np.flatnonzero(sizes >= MIN_COMPONENT_PIXELS).tolist():
        sel = ids == cid
        ys, xs = ys_all[sel], xs_all[sel]
        colour = COLOUR_KEYS[int(label[ys[0], xs[0]])]
        cell = cell_of_point(float(ys.mean()) + 0.5, float(xs.mean()) + 0.5, w, h)
        found.add((colour, _classify(ys, xs), cell))
    return frozenset(found)


def scene_set(scene: Scene) -> frozenset[Triple]:
    """A ShapesWorld scene as the detector's set of ``(colour, shape, cell)`` (offset dropped)."""
    return scene_triples(scene)


def image_matches(image: np.ndarray, scene: Scene, width: int, height: int) -> bool:
    """True when ``image`` is ``width x height`` and its detected scene equals ``scene`` exactly."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[0] != height or img.shape[1] != width:
        return False
    return detect(img) == scene_set(scene)
