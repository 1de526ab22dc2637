"""Named, seeded, deterministic image shifts: what another lab's scanner, stain or framing does to a cell crop.

Each shift is a small pure function PIL.Image -> PIL.Image with a name and its parameters. Random ones
draw from a generator seeded by the shift's seed and the image's own pixels, so the same image always
gets the same shift, and different images get different draws.
"""

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from skimage.color import hed2rgb, rgb2hed

SEED = 1234


@dataclass(frozen=True)
class Shift:
    name: str
    apply: Callable[[Image.Image], Image.Image] = field(compare=False, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image.convert("RGB"))


def image_rng(image: Image.Image, seed: int) -> np.random.Generator:
    """A generator fixed by the seed and the image's pixels."""
    return np.random.default_rng([seed, zlib.crc32(image.tobytes()), image.width, image.height])


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Median colour of the crop's outer ring: the slide background around the cell."""
    pixels = np.asarray(image.convert("RGB"))
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    red, green, blue = (int(v) for v in np.median(ring, axis=0))
    return red, green, blue


# --- colour -----------------------------------------------------------------------------------------------------


def hed_jitter(sigma: float, bias: float, seed: int = SEED) -> Callable[[Image.Image], Image.Image]:
    """Stain variation (Tellez et al., 2018): scale and shift each stain channel of the HED deconvolution."""

    def apply(image: Image.Image) -> Image.Image:
        rng = image_rng(image, seed)
        hed = rgb2hed(np.asarray(image, dtype=np.float64) / 255.0)
        alpha, beta = rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-bias, bias, 3)
        rgb = hed2rgb(hed * alpha + beta)
        return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))

    return apply


def hue(delta: float) -> Callable[[Image.Image], Image.Image]:
    """Rotate the hue by `delta` of a full turn."""

    def apply(image: Image.Image) -> Image.Image:
        h, s, v = image.convert("HSV").split()
        h = h.point(lambda x: (x + round(delta * 256)) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    return apply


def enhance(kind: type, factor: float) -> Callable[[Image.Image], Image.Image]:
    """Pillow's ImageEnhance: Color (saturation), Brightness, Contrast."""
    return lambda image: kind(image).enhance(factor)


def gamma(value: float) -> Callable[[Image.Image], Image.Image]:
    table = [round(255 * (i / 255) ** value) for i in range(256)] * 3
    return lambda image: image.point(table)


def grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


# --- optics and compression -------------------------------------------------------------------------------------


def defocus(radius: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def gaussian_noise(sd: float, seed: int = SEED) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float64)
        noisy = pixels + image_rng(image, seed).normal(0.0, sd, pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))

    return apply


def jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    return apply


# --- geometry and framing ---------------------------------------------------------------------------------------


def magnification(scale: float) -> Callable[[Image.Image], Image.Image]:
    """Another objective: the cell scaled, on a canvas of the crop's own size (cut, or padded with background)."""

    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        scaled = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (w, h), border_colour(image))
        canvas.paste(scaled, ((w - scaled.width) // 2, (h - scaled.height) // 2))
        return canvas

    return apply


def central_crop(fraction: float) -> Callable[[Image.Image], Image.Image]:
    """The central `fraction` of the crop: a tighter segmentation than Herlev's crops."""

    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))

    return apply


class Neighbours:
    """Crops that lend parts of their cells to the field around another cell, as in a wider detector window."""

    def __init__(self, pool: Sequence[Image.Image]):
        self.pool = [p.convert("RGB") for p in pool]
        self.keys = [zlib.crc32(p.tobytes()) for p in self.pool]

    def field(self, image: Image.Image, size: tuple[int, int], pieces: int, seed: int) -> Image.Image:
        """The cell centred on a field of `size`: slide background, with `pieces` parts of other cells at its edges.

        Each piece is a corner of another crop, anchored half outside the field on a random side, so only part
        of it shows, as a neighbouring cell is cut off at a window's edge.
        """
        rng = image_rng(image, seed)
        (w, h), (fw, fh) = image.size, size
        field_image = Image.new("RGB", (fw, fh), border_colour(image))
        own = zlib.crc32(image.tobytes())
        others = [p for p, key in zip(self.pool, self.keys, strict=True) if key != own]
        for _ in range(pieces if others else 0):
            other = others[int(rng.integers(0, len(others)))]
            pw, ph = max(1, min(other.width, fw) // 2), max(1, min(other.height, fh) // 2)
            sx, sy = int(rng.integers(0, other.width - pw + 1)), int(rng.integers(0, other.height - ph + 1))
            piece = other.crop((sx, sy, sx + pw, sy + ph))
            side = int(rng.integers(0, 4))
            x = int(rng.integers(-pw // 2, fw - pw // 2)) if side < 2 else (-pw // 2 if side == 2 else fw - pw // 2)
            y = int(rng.integers(-ph // 2, fh - ph // 2)) if side >= 2 else (-ph // 2 if side == 0 else fh - ph // 2)
            field_image.paste(piece, (x, y))
        field_image.paste(image, ((fw - w) // 2, (fh - h) // 2))
        return field_image

    def window(self, image: Image.Image, size: int, pieces: int, seed: int) -> Image.Image:
        """A `size` x `size` pixel window centred on the cell: a large cell is cut to its centre, a small one sits
        at its true scale on slide background with parts of other cells."""
        w, h = image.size
        if w < size or h < size:
            image = self.field(image, (max(w, size), max(h, size)), pieces, seed)
            w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        return image.crop((left, top, left + size, top + size))


def on_slide_field(
    pool: Sequence[Image.Image], factor: float = 1.6, pieces: int = 4, seed: int = SEED
) -> Callable[[Image.Image], Image.Image]:
    """The cell centred on a field `factor` times larger, of slide background with parts of other cells.

    pool: other crops of the same split, for the neighbouring cells.
    """
    neighbours = Neighbours(pool)

    def apply(image: Image.Image) -> Image.Image:
        size = (round(image.width * factor), round(image.height * factor))
        return neighbours.field(image, size, pieces, seed)

    return apply


def fixed_window(
    pool: Sequence[Image.Image], size: int, pieces: int = 4, seed: int = SEED
) -> Callable[[Image.Image], Image.Image]:
    """A window of `size` x `size` pixels centred on the cell, whatever the cell's size, as many labs cut cells.

    Unlike Herlev's tight crops, the window's size says nothing about the cell's. pool: crops of the same split.
    """
    neighbours = Neighbours(pool)
    return lambda image: neighbours.window(image, size, pieces, seed)


def identity(image: Image.Image) -> Image.Image:
    return image


def standard_shifts(pool: Sequence[Image.Image], seed: int = SEED) -> list[Shift]:
    """The robustness suite, unshifted first. pool: crops of the same split (for the slide-field shift)."""
    return [
        Shift("none", identity, {}, "the crop as it is"),
        Shift("stain_hed_weak", hed_jitter(0.05, 0.01, seed), {"sigma": 0.05, "bias": 0.01, "seed": seed},
              "HED stain channels scaled by U(1±0.05) and shifted by U(±0.01)"),
        Shift("stain_hed_strong", hed_jitter(0.15, 0.03, seed), {"sigma": 0.15, "bias": 0.03, "seed": seed},
              "HED stain channels scaled by U(1±0.15) and shifted by U(±0.03)"),
        Shift("hue_+0.05", hue(0.05), {"delta": 0.05}, "hue rotated by 18 degrees"),
        Shift("saturation_x1.5", enhance(ImageEnhance.Color, 1.5), {"factor": 1.5}, "saturation x1.5"),
        Shift("saturation_x0.5", enhance(ImageEnhance.Color, 0.5), {"factor": 0.5}, "saturation x0.5"),
        Shift("brightness_x1.2", enhance(ImageEnhance.Brightness, 1.2), {"factor": 1.2}, "brightness x1.2"),
        Shift("contrast_x0.7", enhance(ImageEnhance.Contrast, 0.7), {"factor": 0.7}, "contrast x0.7"),
        Shift("gamma_1.5", gamma(1.5), {"gamma": 1.5}, "gamma 1.5 (darker mid-tones)"),
        Shift("defocus_blur_r2", defocus(2.0), {"radius_px": 2.0}, "Gaussian blur, radius 2 px of the crop"),
        Shift("gaussian_noise_sd10", gaussian_noise(10.0, seed), {"sd": 10.0, "seed": seed},
              "Gaussian pixel noise, SD 10 of 255"),
        Shift("jpeg_q30", jpeg(30), {"quality": 30}, "JPEG at quality 30"),
        Shift("grayscale", grayscale, {}, "luminance only, as RGB"),
        Shift("magnification_x0.75", magnification(0.75), {"scale": 0.75},
              "cell at 0.75x on the crop's canvas, padded with border colour"),
        Shift("magnification_x1.5", magnification(1.5), {"scale": 1.5}, "cell at 1.5x, cut to the crop's canvas"),
        Shift("central_crop_60", central_crop(0.6), {"fraction": 0.6}, "central 60 % window of the crop"),
        Shift("slide_field_x1.6", on_slide_field(pool, 1.6, 4, seed), {"factor": 1.6, "pieces": 4, "seed": seed},
              "cell on a 1.6x field of slide background with parts of other cells of the split"),
        Shift("window_100px", fixed_window(pool, 100, 4, seed), {"size_px": 100, "pieces": 4, "seed": seed},
              "a 100 x 100 px window centred on the cell (cut, or on slide background with parts of other cells)"),
        Shift("window_160px", fixed_window(pool, 160, 4, seed), {"size_px": 160, "pieces": 4, "seed": seed},
              "a 160 x 160 px window centred on the cell (cut, or on slide background with parts of other cells)"),
    ]  # fmt: skip
