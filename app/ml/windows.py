"""Fixed-size windows of the training cells, for the "robust_windows" augmentation.

Many labs cut a fixed window centred on each nucleus instead of Herlev's tight crop around the cell: a large
normal cell is cut to its centre, a small abnormal one sits at its true scale among slide background and parts
of other cells. Resizing Herlev's crops hides both, so the network is shown such windows, cut at full
resolution from the original images (upscaling a 128-px crop would only blur them).
"""

import math
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from app.ml.data import Dataset
from app.ml.preprocessing import InputSpec, decode_image, prepare_image
from app.ml.shifts import Neighbours

VIEWS = 4  # windows per cell, besides the crop itself; re-drawn rotations and colours vary them further
SIZES_PX = (64, 256)  # window sides, log-uniform: Herlev's median crop is 124 px, its cells 40 to 768 px
PIECES = 4  # parts of other cells around a small cell


def window_views(
    dataset: Dataset, indices: Sequence[int] | np.ndarray, spec: InputSpec, seed: int, progress: bool = True
) -> np.ndarray:
    """uint8 (n, 1 + VIEWS, size, size, 3): view 0 is the cell as `load_arrays` gives it, then VIEWS windows.

    Window sides are drawn per cell and view from `seed`; neighbouring cells come only from `indices`, so
    training windows never show a held-out cell.
    """
    images = [decode_image(dataset.samples[i].path.read_bytes()) for i in indices]
    neighbours = Neighbours(images)
    rng = np.random.default_rng(seed)
    low, high = (math.log(s) for s in SIZES_PX)
    sides = np.exp(rng.uniform(low, high, (len(images), VIEWS))).round().astype(int)
    out = np.empty((len(images), 1 + VIEWS, spec.size, spec.size, 3), np.uint8)
    for i, image in enumerate(tqdm(images, desc="cutting windows", unit="img", disable=not progress)):
        out[i, 0] = prepare_image(image, spec)
        for view, side in enumerate(sides[i], 1):
            out[i, view] = prepare_image(neighbours.window(image, int(side), PIECES, seed + view), spec)
    return out
