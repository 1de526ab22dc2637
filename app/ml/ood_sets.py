"""Deterministic sets of images that are not single Pap-smear cells, to measure the OOD score against.

Each set is built from a seed (and, for slide background, from Herlev crops): the same call gives the
same images on every machine, with no download. Sizes vary like Herlev crops (tens to hundreds of px).
"""

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data as skdata

OOD_SET_SIZE = 40
WORDS = "specimen accession slide stain cell nucleus report sample order patient lab cytology result".split()


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(48, 320)), int(rng.integers(48, 320))


def uniform_noise(rng: np.random.Generator) -> Image.Image:
    w, h = _size(rng)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def gaussian_noise(rng: np.random.Generator) -> Image.Image:
    w, h = _size(rng)
    mean, sd = rng.uniform(60, 200, 3), rng.uniform(15, 60)
    return Image.fromarray(np.clip(rng.normal(mean, sd, (h, w, 3)), 0, 255).astype(np.uint8))


def smooth_gradient(rng: np.random.Generator) -> Image.Image:
    """A linear blend between two random colours in a random direction."""
    w, h = _size(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    t = (t - t.min()) / (np.ptp(t) or 1.0)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return Image.fromarray((start + t[..., None] * (end - start)).astype(np.uint8))


def rendered_text(rng: np.random.Generator) -> Image.Image:
    """Lines of dark text on a light background: a scanned form or label."""
    w, h = _size(rng)
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.uniform(200, 255, 3)))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(10, 24)))
    for y in range(2, h, int(rng.integers(14, 30))):
        line = " ".join(rng.choice(WORDS, 4))
        draw.text((int(rng.integers(0, 12)), y), line, fill=tuple(int(v) for v in rng.uniform(0, 80, 3)), font=font)
    return image


_PHOTOS: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
    """Colour photographs that ship inside scikit-image (no download)."""
    if not _PHOTOS:
        loaders: tuple[Callable[[], np.ndarray], ...] = (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket)
        _PHOTOS.extend(np.asarray(load()) for load in loaders)
    return _PHOTOS


def photograph_crop(rng: np.random.Generator) -> Image.Image:
    """A random window of an everyday photograph (person, cup, cat, rocket)."""
    photo = _photos()[int(rng.integers(0, len(_photos())))]
    h, w = photo.shape[:2]
    side = int(rng.integers(96, min(h, w)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    window = Image.fromarray(photo[top : top + side, left : left + side])
    return window.resize(_size(rng), Image.Resampling.BILINEAR)


def flat_square(rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(32, 320))
    return Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))


def slide_background(crops: Sequence[Image.Image]) -> Callable[[np.random.Generator], Image.Image]:
    """Empty slide: a corner patch of a Herlev crop (background around the cell), tiled up by mirroring."""

    def make(rng: np.random.Generator) -> Image.Image:
        crop = np.asarray(crops[int(rng.integers(0, len(crops)))].convert("RGB"))
        patch_h, patch_w = max(8, crop.shape[0] // 6), max(8, crop.shape[1] // 6)
        corner = int(rng.integers(0, 4))
        rows = slice(0, patch_h) if corner < 2 else slice(crop.shape[0] - patch_h, None)
        cols = slice(0, patch_w) if corner % 2 == 0 else slice(crop.shape[1] - patch_w, None)
        patch = crop[rows, cols]
        w, h = _size(rng)
        reps = (h // patch.shape[0] + 2, w // patch.shape[1] + 2)
        tile = _mirror_tile(patch, reps)
        return Image.fromarray(np.ascontiguousarray(tile[:h, :w]))

    return make


def _mirror_tile(patch: np.ndarray, reps: tuple[int, int]) -> np.ndarray:
    """Tile a patch with alternate copies mirrored, so the seams do not show as edges."""
    pair = np.concatenate([patch, patch[:, ::-1]], axis=1)
    block = np.concatenate([pair, pair[::-1]], axis=0)
    return np.tile(block, (reps[0] // 2 + 1, reps[1] // 2 + 1, 1))


def ood_sets(
    background_crops: Sequence[Image.Image], seed: int = 2026, n: int = OOD_SET_SIZE
) -> dict[str, list[Image.Image]]:
    """Every set by name, n images each, the same for the same seed and crops."""
    makers: dict[str, Callable[[np.random.Generator], Image.Image]] = {
        "uniform_noise": uniform_noise,
        "gaussian_noise": gaussian_noise,
        "smooth_gradient": smooth_gradient,
        "rendered_text": rendered_text,
        "photograph": photograph_crop,
        "slide_background": slide_background(background_crops),
        "flat_square": flat_square,
    }
    sets = {}
    for index, (name, make) in enumerate(makers.items()):
        rng = np.random.default_rng([seed, index])
        sets[name] = [make(rng) for _ in range(n)]
    return sets
