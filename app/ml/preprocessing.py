"""The one preprocessing path from a cell image (file bytes or PIL image) to network input.

Training, evaluation and serving all call `prepare_image`; the network itself holds the
pixel normalisation (see `model.py`), so what leaves this module is plain RGB pixels.
"""

import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidImageError

FitMode = Literal["resize", "pad"]

# A Herlev crop is at most 768 px wide; anything far beyond a single cell is refused early.
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class InputSpec:
    """How a variable-size crop becomes a square network input.

    resize: stretch the crop to size x size (hides absolute cell size, keeps detail).
    pad:    put the crop at true scale on a canvas x canvas field filled with the crop's
            border colour (keeps cell size, which is diagnostic), then scale to size x size.
            A crop larger than the canvas is shrunk to fit.
    """

    size: int = 128
    fit: FitMode = "resize"
    canvas: int = 256

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "fit": self.fit, "canvas": self.canvas}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        return cls(size=int(data["size"]), fit=data["fit"], canvas=int(data.get("canvas", 256)))


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode and fully load an image, upright, in the mode it was sent in (input checks look at the mode);
    InvalidImageError with a clear reason for an empty, unknown, damaged, truncated or over-large file."""
    if not data:
        raise InvalidImageError("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(f"the image is {width}x{height} pixels; at most {max_pixels:,} are accepted")
            image.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"the image has too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("the file is not an image PapCAD can read (use BMP, PNG, JPEG or TIFF)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"the image is damaged or truncated ({exc})") from exc
    if image.width < 1 or image.height < 1:
        raise InvalidImageError("the image has no pixels")
    upright = _upright(image)
    upright.format = image.format  # exif_transpose returns a copy without the file's format
    return upright


def decode_image(data: bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode (or take an already opened image) as upright RGB, or raise InvalidImageError."""
    image = data if isinstance(data, Image.Image) else open_image(data, max_pixels)
    if image.width < 1 or image.height < 1:
        raise InvalidImageError("the image has no pixels")
    upright = _upright(image)
    if upright.mode == "RGB" and upright is not data:
        return upright  # already a fresh RGB image: no second full-size copy (95 MiB for a 5000 x 5000 upload)
    return upright.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """The image as the camera held it (EXIF Orientation applied once, here), so the model, the stored
    size and the heatmap all see the same upright cell. A damaged EXIF block leaves the pixels as stored."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
            return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF must not refuse an otherwise good image
        pass
    return image


def _border_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the crop's outer ring: the slide background around the cell."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    red, green, blue = (int(v) for v in np.median(ring, axis=0))
    return red, green, blue


def prepare_image(data: bytes | Image.Image, spec: InputSpec) -> np.ndarray:
    """Cell image -> uint8 array (size, size, 3), ready to feed the network."""
    image = decode_image(data)
    if spec.fit == "resize":
        fitted = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    elif spec.fit == "pad":
        if max(image.size) > spec.canvas:
            image = image.copy()
            image.thumbnail((spec.canvas, spec.canvas), Image.Resampling.BILINEAR)
        background = _border_colour(np.asarray(image))
        canvas = Image.new("RGB", (spec.canvas, spec.canvas), background)
        canvas.paste(image, ((spec.canvas - image.width) // 2, (spec.canvas - image.height) // 2))
        fitted = canvas.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    else:
        raise ValueError(f"unknown fit mode {spec.fit!r}")
    return np.asarray(fitted, dtype=np.uint8)


def prepare_batch(images: list[bytes | Image.Image], spec: InputSpec) -> np.ndarray:
    """Stack prepared images into a (n, size, size, 3) uint8 batch."""
    return np.stack([prepare_image(image, spec) for image in images])
