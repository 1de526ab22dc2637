"""Image decoding and preparation (app.ml.preprocessing) and the labelled folder (app.ml.data)."""

import csv
import io
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.errors import DatasetError, InvalidImageError
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES
from app.ml.data import discover, fixed_split, group_of, grouped_folds, load_arrays
from app.ml.preprocessing import MAX_PIXELS, InputSpec, decode_image, prepare_batch, prepare_image

SPECS = [InputSpec(size=32, fit="resize"), InputSpec(size=64, fit="pad", canvas=256)]
BACKGROUND = (220, 215, 225)
CELL = (40, 30, 110)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, followed by a token IDAT: no real pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def _synthetic_cell(width: int, height: int, border: int) -> Image.Image:
    """A dark rectangle ('cell') on a light background ring `border` pixels wide."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    pixels[border : height - border, border : width - border] = CELL
    return Image.fromarray(pixels)


def _dark_extent(prepared: np.ndarray) -> tuple[int, int]:
    """(columns, rows) of the prepared image that hold any cell-coloured pixel."""
    dark = prepared.astype(int).mean(axis=2) < 150
    return int(dark.any(axis=0).sum()), int(dark.any(axis=1).sum())


@pytest.fixture(scope="module")
def real_bmp(herlev_one_per_class) -> bytes:
    return herlev_one_per_class["light_dysplastic"].read_bytes()


# --- prepare_image ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fit}{s.size}")
def test_prepare_image_gives_the_same_pixels_for_bytes_and_pil(spec, herlev_one_per_class):
    for path in herlev_one_per_class.values():
        data = path.read_bytes()
        from_bytes = prepare_image(data, spec)
        from_pil = prepare_image(Image.open(io.BytesIO(data)), spec)
        assert from_bytes.shape == (spec.size, spec.size, 3)
        assert from_bytes.dtype == np.uint8
        assert np.array_equal(from_bytes, from_pil)


@pytest.mark.parametrize("fit", ["resize", "pad"])
@pytest.mark.parametrize("size", [32, 64])
def test_prepare_image_gives_a_square_uint8_rgb_array(fit, size, herlev_one_per_class, herlev_dir):
    spec = InputSpec(size=size, fit=fit, canvas=256)
    # Real crops of many sizes, and the widest Herlev crop (768 px), larger than the 256 px canvas.
    widest = max(_manifest(herlev_dir), key=lambda row: int(row["width"]))
    assert int(widest["width"]) > spec.canvas
    for path in [*herlev_one_per_class.values(), herlev_dir / widest["path"]]:
        prepared = prepare_image(path.read_bytes(), spec)
        assert prepared.shape == (size, size, 3)
        assert prepared.dtype == np.uint8
        assert prepared.std() > 0  # not a blank canvas


def test_prepare_image_accepts_other_pixel_modes_as_rgb(real_bmp):
    image = Image.open(io.BytesIO(real_bmp))
    spec = InputSpec(size=32)
    for mode in ("L", "RGBA", "P", "CMYK"):
        prepared = prepare_image(image.convert(mode), spec)
        assert prepared.shape == (32, 32, 3) and prepared.dtype == np.uint8
    grey = prepare_image(image.convert("L"), spec)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_pad_mode_keeps_a_small_cell_small():
    crop = _synthetic_cell(40, 40, border=1)  # a 40 px crop, about 38 px of cell
    padded = prepare_image(crop, InputSpec(size=64, fit="pad", canvas=256))
    columns, rows = _dark_extent(padded)
    assert columns == pytest.approx(64 * 40 / 256, abs=2)
    assert rows == pytest.approx(64 * 40 / 256, abs=2)
    # The canvas is filled with the crop's border colour, and the cell sits in the middle.
    assert tuple(padded[0, 0]) == BACKGROUND and tuple(padded[-1, -1]) == BACKGROUND
    assert tuple(padded[32, 32]) == pytest.approx(CELL, abs=3)

    stretched = prepare_image(crop, InputSpec(size=64, fit="resize"))
    assert min(_dark_extent(stretched)) >= 60  # resize fills the input with the cell


def test_pad_mode_shrinks_a_crop_larger_than_the_canvas_to_fit():
    crop = _synthetic_cell(600, 300, border=30)  # 2:1, wider than the 256 px canvas
    columns, rows = _dark_extent(prepare_image(crop, InputSpec(size=64, fit="pad", canvas=256)))
    assert columns == pytest.approx(64 * 540 / 600, abs=2)
    assert rows == pytest.approx(64 * 240 / 600, abs=2)


def test_prepare_batch_stacks_in_order(herlev_one_per_class):
    spec = InputSpec(size=32)
    images = [p.read_bytes() for p in herlev_one_per_class.values()]
    batch = prepare_batch(images, spec)
    assert batch.shape == (len(images), 32, 32, 3) and batch.dtype == np.uint8
    for row, data in zip(batch, images, strict=True):
        assert np.array_equal(row, prepare_image(data, spec))


# --- decode_image: what the server and CLI refuse -----------------------------------------------


def test_decode_image_refuses_empty_bytes():
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not a picture\n" * 20, b"%PDF-1.7\n" + bytes(range(256)) * 4, b"\x00"],
    ids=["text", "pdf", "one-byte"],
)
def test_decode_image_refuses_bytes_that_are_not_an_image(data):
    with pytest.raises(InvalidImageError, match="not an image"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["BMP", "PNG", "JPEG"])
def test_decode_image_refuses_a_truncated_file(fmt, real_bmp):
    data = real_bmp if fmt == "BMP" else _encode(Image.open(io.BytesIO(real_bmp)), fmt)
    decode_image(data)  # the whole file is fine
    with pytest.raises(InvalidImageError, match="truncated|damaged"):
        decode_image(data[: len(data) // 2])


def test_decode_image_refuses_an_absurd_pixel_count_from_the_header_alone():
    huge = _png_header(50_000, 50_000)
    assert len(huge) < 100  # only a header: nothing is decoded before the refusal
    with pytest.raises(InvalidImageError, match="too many pixels"):
        decode_image(huge)
    # Above our own limit but below Pillow's decompression-bomb threshold.
    with pytest.raises(InvalidImageError, match=f"at most {MAX_PIXELS:,}"):
        decode_image(_png_header(7_000, 7_000))


def test_decode_image_returns_a_loaded_rgb_image(real_bmp):
    image = decode_image(real_bmp)
    assert image.mode == "RGB"
    assert image.size == Image.open(io.BytesIO(real_bmp)).size


# --- the labelled folder ------------------------------------------------------------------------


def _manifest(herlev_dir: Path) -> list[dict]:
    with open(herlev_dir / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def herlev(herlev_dir):
    return discover(herlev_dir)


def test_discover_finds_all_917_herlev_images_in_7_classes(herlev, herlev_dir):
    assert len(herlev.samples) == 917
    counts = Counter(CLASS_NAMES[label] for label in herlev.labels)
    assert set(counts) == set(CLASS_NAMES)
    manifest = _manifest(herlev_dir)
    assert counts == Counter(row["class"] for row in manifest)
    assert sum(counts[c] for c in ABNORMAL_CLASSES) == 675
    # Groups come from the manifest's group_prefix, which is the first number of the file name.
    assert len(set(herlev.groups)) == len({row["group_prefix"] for row in manifest}) == 323
    assert all(sample.group == group_of(sample.path) for sample in herlev.samples)


def test_fixed_split_is_disjoint_by_group_and_tests_every_class(herlev):
    split = fixed_split(herlev, seed=1234)
    parts = {"train": split.train, "val": split.val, "test": split.test}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(herlev.samples)))
    groups = {name: set(herlev.groups[idx]) for name, idx in parts.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert set(herlev.labels[split.test]) == set(range(len(CLASS_NAMES)))
    assert set(herlev.labels[split.val]) == set(range(len(CLASS_NAMES)))
    assert len(split.test) == pytest.approx(len(herlev.samples) / 5, rel=0.1)
    # The same seed gives the same split.
    again = fixed_split(herlev, seed=1234)
    assert np.array_equal(again.test, split.test) and np.array_equal(again.val, split.val)


def test_grouped_folds_are_group_disjoint_and_cover_every_image_once(herlev):
    folds = grouped_folds(herlev, k=5, seed=1234)
    assert len(folds) == 5
    held_out = np.concatenate([held for _, held in folds])
    assert sorted(held_out.tolist()) == list(range(len(herlev.samples)))
    for train, held in folds:
        assert not set(herlev.groups[train]) & set(herlev.groups[held])
        assert len(train) + len(held) == len(herlev.samples)


def test_load_arrays_matches_serving_preparation_exactly(herlev):
    """Training pixels (load_arrays over files) == serving pixels (prepare_batch over uploaded bytes)."""
    rng = np.random.default_rng(0)
    picked = herlev.subset(np.sort(rng.choice(len(herlev.samples), size=6, replace=False)))
    for spec in SPECS:
        x, y = load_arrays(picked, spec, progress=False)
        served = prepare_batch([sample.path.read_bytes() for sample in picked.samples], spec)
        assert x.dtype == served.dtype == np.uint8
        assert np.array_equal(x, served)
        assert y.tolist() == [sample.label for sample in picked.samples]


def _tiny_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "PNG")


def _make_folder(root: Path, classes, per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{100 + c * per_class + i}-1-001.png").write_bytes(_tiny_png(c * 10 + i))
    return root


def test_discover_reads_a_generated_folder(tmp_path):
    dataset = discover(_make_folder(tmp_path / "data", CLASS_NAMES))
    assert len(dataset.samples) == 14
    assert dataset.labels.tolist() == [c for c in range(7) for _ in range(2)]
    assert len(set(dataset.groups)) == 14  # no manifest: groups from the file names


def test_discover_refuses_a_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "nowhere")


def test_discover_refuses_a_folder_without_class_folders(tmp_path):
    root = _make_folder(tmp_path / "data", ["cats", "dogs"])
    with pytest.raises(DatasetError, match="none of the class folders"):
        discover(root)


def test_discover_refuses_a_folder_missing_one_class(tmp_path):
    root = _make_folder(tmp_path / "data", CLASS_NAMES)
    shutil.rmtree(root / "severe_dysplastic")
    with pytest.raises(DatasetError, match="lacks the class folder.*severe_dysplastic"):
        discover(root)


def test_discover_refuses_an_empty_class_folder(tmp_path):
    root = _make_folder(tmp_path / "data", CLASS_NAMES)
    for path in (root / "normal_columnar").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="holds no images"):
        discover(root)


def test_a_dataset_too_small_to_split_is_a_dataset_error(tmp_path):
    dataset = discover(_make_folder(tmp_path / "data", CLASS_NAMES, per_class=3))
    with pytest.raises(DatasetError, match="too few"):
        fixed_split(dataset, seed=1234)


def test_fingerprint_changes_when_an_image_changes_or_moves_class(tmp_path):
    root = _make_folder(tmp_path / "data", CLASS_NAMES)
    original = discover(root).fingerprint()
    assert discover(root).fingerprint() == original
    moved = root / "normal_columnar" / "102-1-001.png"  # same name, another class
    shutil.move(root / "normal_intermediate" / "102-1-001.png", moved)
    assert discover(root).fingerprint() != original
    shutil.move(moved, root / "normal_intermediate" / "102-1-001.png")
    assert discover(root).fingerprint() == original
    (root / "carcinoma_in_situ" / "112-1-001.png").write_bytes(_tiny_png(999))
    assert discover(root).fingerprint() != original
