"""Reading the benchmark's images (no Caffe needed): scikit-image's shipped photographs, a user's
folder (good files, an unreadable one, an empty or missing folder), and cycling batches.

Preprocessing goes through pycaffe's caffe.io, so it is tested in caffe_tests/test_synthetic.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparse_caffe.models import images
from sparse_caffe.errors import UserError


def write_png(path, rgb) -> None:
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)


def solid(height: int, width: int, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


# ----------------------------------------------------------------------------- shipped photographs

def test_shipped_photos_are_real_colour_photographs_in_a_fixed_order():
    photos = images.shipped_photos()
    assert [p.name for p in photos] == ["astronaut", "chelsea", "coffee", "rocket",
                                        "motorcycle_left", "motorcycle_right"]
    assert [p.source for p in photos] == [f"skimage:{p.name}" for p in photos]
    for photo in photos:
        assert photo.rgb.dtype == np.float32 and photo.rgb.ndim == 3 and photo.rgb.shape[2] == 3
        assert min(photo.rgb.shape[:2]) >= 256  # the 256 x 256 warp only shrinks
        assert 0.0 <= photo.rgb.min() and photo.rgb.max() <= 1.0
        assert photo.rgb.std() > 0.05  # a photograph, not a flat image


def test_astronaut_pixel_is_skimages_own_divided_by_255():
    import skimage.data
    photo = images.shipped_photos(1)[0]
    assert photo.name == "astronaut"
    np.testing.assert_array_equal(photo.rgb[100, 200],
                                  (skimage.data.astronaut()[100, 200] / 255.0).astype(np.float32))


def test_the_first_n_shipped_photos():
    assert [p.name for p in images.shipped_photos(2)] == ["astronaut", "chelsea"]
    assert len(images.read_images(None)) == len(images.SHIPPED_PHOTOS)
    assert [p.name for p in images.read_images(3)] == ["astronaut", "chelsea", "coffee"]


@pytest.mark.parametrize("count", [7, 100])
def test_more_photos_than_ship_is_a_user_error(count):
    with pytest.raises(UserError, match=f"asked for {count} images, but only 6 photographs ship"):
        images.shipped_photos(count)


@pytest.mark.parametrize("count", [0, -1, True])
def test_a_count_must_be_a_whole_number_of_at_least_one(count):
    with pytest.raises(UserError, match="whole number of at least 1"):
        images.read_images(count)


def test_images_are_a_count_or_a_folder():
    with pytest.raises(UserError, match="images must be a count or a folder, got 2.5"):
        images.read_images(2.5)


# ----------------------------------------------------------------------------- a user's folder

def test_folder_reads_image_files_sorted_and_skips_an_unreadable_one(tmp_path, capsys):
    write_png(tmp_path / "b.png", solid(40, 50, (10, 20, 30)))
    Image.fromarray(solid(30, 30, (200, 100, 0))).save(tmp_path / "a.jpg", quality=95)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    Image.fromarray(np.full((20, 20), 77, np.uint8)).save(tmp_path / "c_grey.png")
    (tmp_path / "notes.txt").write_text("not an image, and not named like one: ignored")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")

    found = images.read_folder(tmp_path)

    assert [image.name for image in found] == ["a.jpg", "b.png", "c_grey.png"]
    assert [image.source for image in found] == [str((tmp_path / n).resolve())
                                                 for n in ("a.jpg", "b.png", "c_grey.png")]
    np.testing.assert_allclose(found[1].rgb[0, 0], np.array([10, 20, 30]) / 255.0, rtol=1e-6)
    assert found[2].rgb.shape == (20, 20, 3)  # grey repeated into three channels, as Caffe does
    np.testing.assert_allclose(found[2].rgb[5, 5], [77 / 255.0] * 3, rtol=1e-6)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    broken = tmp_path / "broken.jpg"
    assert lines[0].startswith(f"warning: skipping {broken}: not a readable image (")


def test_truncated_image_is_skipped(tmp_path, capsys):
    write_png(tmp_path / "good.png", solid(16, 16, (1, 2, 3)))
    write_png(tmp_path / "whole.png", solid(64, 64, (9, 9, 9)))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.png").unlink()
    assert [image.name for image in images.read_folder(tmp_path)] == ["good.png"]
    assert "warning: skipping" in capsys.readouterr().err


def test_rgba_loses_its_alpha_channel(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # fully transparent red: Caffe keeps the red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    (image,) = images.read_folder(tmp_path)
    np.testing.assert_array_equal(image.rgb[0, 0], [1.0, 0.0, 0.0])


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no image files in it"):
        images.read_folder(tmp_path)


def test_folder_without_image_files_is_a_user_error(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="no image files in it"):
        images.read_folder(tmp_path)


def test_folder_with_only_unreadable_images_is_a_user_error(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "y.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="none of its 2 image files could be read"):
        images.read_folder(tmp_path)
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        images.read_folder(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path):
    write_png(tmp_path / "one.png", solid(4, 4, (0, 0, 0)))
    with pytest.raises(UserError, match="not a folder"):
        images.read_folder(tmp_path / "one.png")


def test_load_images_reports_folder_problems_before_it_needs_pycaffe(tmp_path):
    # These fail while reading, before the preprocessing imports caffe (absent here).
    with pytest.raises(UserError, match="no such folder"):
        images.load_images("caffenet", tmp_path / "missing")
    with pytest.raises(UserError, match="no image files"):
        images.load_images("resnet50", tmp_path)
    with pytest.raises(UserError, match="unknown net 'vgg'"):
        images.load_images("vgg", None)


# ----------------------------------------------------------------------------- conversion, crops

def test_to_float_rgb_refuses_what_caffe_would_not_read():
    with pytest.raises(ValueError, match="8-bit"):
        images.to_float_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="grey, RGB or RGBA"):
        images.to_float_rgb(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("size, top", [(227, 14), (224, 16)])
def test_centre_crop_uses_classifiers_offsets(size, top):
    # Classifier.predict: centre 128, crop = int(128 -/+ size/2): 14..241 for 227, 16..240 for 224
    image = np.arange(256 * 256).reshape(256, 256, 1)
    crop = images.centre_crop(image, size)
    assert crop.shape == (size, size, 1)
    assert crop[0, 0, 0] == image[top, top, 0]


# ----------------------------------------------------------------------------- batches

def synthetic_set(count: int) -> images.ImageSet:
    """A SYNTHETIC image set: image i is filled with the value i (for checking the cycling only)."""
    data = np.stack([np.full((3, 2, 2), i, np.float32) for i in range(count)])
    return images.ImageSet(net="caffenet", names=tuple(f"synthetic{i}" for i in range(count)),
                           sources=tuple(f"synthetic:{i}" for i in range(count)),
                           sha256=images.batch_sha256(data), data=data)


def ids(batch: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch]


def test_batches_cover_every_image_and_top_up_the_last_from_the_start():
    result = [ids(b) for b in images.batches(synthetic_set(5), 2)]
    assert result == [[0, 1], [2, 3], [4, 0]]
    assert images.fed_counts(synthetic_set(5), 2) == [2, 1, 1, 1, 1]


def test_batch_larger_than_the_set_cycles_within_one_batch():
    assert [ids(b) for b in images.batches(synthetic_set(3), 7)] == [[0, 1, 2, 0, 1, 2, 0]]


def test_batches_divide_exactly_and_a_count_continues_the_cycle():
    assert [ids(b) for b in images.batches(synthetic_set(4), 2)] == [[0, 1], [2, 3]]
    assert images.fed_counts(synthetic_set(4), 2) == [1, 1, 1, 1]
    assert [ids(b) for b in images.batches(synthetic_set(3), 2, count=4)] == \
        [[0, 1], [2, 0], [1, 2], [0, 1]]
    assert images.fed_counts(synthetic_set(3), 2, count=4) == [3, 3, 2]


def test_batches_are_copies_with_exactly_batch_images():
    imageset = synthetic_set(3)
    for batch in images.batches(imageset, 2):
        assert batch.shape == (2, 3, 2, 2) and batch.dtype == np.float32
        batch[...] = -1
    assert ids(imageset.data) == [0, 1, 2]


@pytest.mark.parametrize("batch", [0, -2, True, 1.5])
def test_bad_batch_size_is_a_user_error(batch):
    with pytest.raises(UserError, match="batch size"):
        list(images.batches(synthetic_set(2), batch))


def test_batch_hash_is_stable_and_sees_every_value_and_the_shape():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    first = images.batch_sha256(data)
    assert first == images.batch_sha256(data.copy()) == images.batch_sha256(data.astype(np.float64))
    changed = data.copy()
    changed[1, 2, 1, 1] += 1e-3
    assert images.batch_sha256(changed) != first
    assert images.batch_sha256(data.reshape(1, 6, 2, 2)) != first


# ----------------------------------------------------------------------------- 16-bit and huge files

def write_png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 48-bit colour PNG (PIL cannot write one): signature, IHDR, one IDAT, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    height, width, _ = rgb16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """The same picture stored with 8 and with 16 bits reads the same (it used to clip at 255,
    turning a 16-bit grey picture almost white)."""
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    np.testing.assert_array_equal(images.read_image(tmp_path / "grey16.png"),
                                  images.read_image(tmp_path / "grey8.png"))
    colour8 = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    write_png(tmp_path / "colour8.png", colour8)
    write_png16_rgb(tmp_path / "colour16.png", colour8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(images.read_image(tmp_path / "colour16.png"),
                                  images.read_image(tmp_path / "colour8.png"))


def test_a_huge_image_is_refused_in_one_line_without_pils_warning(tmp_path, monkeypatch, capsys):
    """Above MAX_PIXELS a PNG is skipped with one warning (PIL's own DecompressionBombWarning,
    which fires from its lower limit, never shows); the limits are scaled down for the test."""
    import warnings
    monkeypatch.setattr(images, "MAX_PIXELS", 50_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # 300 x 300 is in PIL's warning range
    write_png(tmp_path / "big.png", solid(300, 300, (10, 200, 30)))
    write_png(tmp_path / "small.png", solid(100, 100, (10, 200, 30)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = images.read_folder(tmp_path)
    assert [image.name for image in read] == ["small.png"]
    assert caught == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "big.png" in err[0] and "300 x 300 pixels is more than" in err[0]


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images, "MAX_PIXELS", 50_000)
    Image.fromarray(solid(400, 400, (200, 100, 50))).save(tmp_path / "big.jpg", quality=95)
    rgb = images.read_image(tmp_path / "big.jpg")
    assert rgb.shape == (200, 200, 3)  # 1/2 scale: 40,000 pixels
    assert np.abs(rgb[100, 100] * 255 - (200, 100, 50)).max() < 4
    assert "decoded at 1/2 scale" in capsys.readouterr().err
