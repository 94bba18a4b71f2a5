"""The benchmark's inputs: real photographs, preprocessed as BVLC Caffe's Python classifier does.

By default the inputs are the colour photographs that scikit-image ships inside its wheel (no
download; see SHIPPED_PHOTOS for which, and which of its other images are left out and why). A
folder of the user's own images (ImageNet validation images, say) can be given instead.

Preprocessing is BVLC's `caffe.Classifier` / `classify.py` with its defaults, through pycaffe's own
`caffe.io`: the image as float RGB in 0..1 (grey images repeated into three channels, an alpha
channel dropped, as `caffe.io.load_image` does), warped to 256 x 256 with `caffe.io.resize_image`,
the centre crop of the net's input size (227 CaffeNet, 224 ResNet-50) taken as `Classifier.predict`
takes it, then `caffe.io.Transformer`: HWC -> CHW, RGB -> BGR, x 255, minus the per-channel BGR mean
(104, 117, 123; nets.NETS). The result is float32 (N, 3, S, S).

Reading is pure Python (PIL, scikit-image); only the preprocessing imports pycaffe, so reading
errors (no such folder, nothing readable) are reported before pycaffe is needed.

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import UserError
from .nets import NetInfo, _caffe, net_info

# BVLC's classify.py / Classifier: images are warped to this size, then centre-cropped.
RESIZE_DIMS = (256, 256)

# Suffixes tried as images in a user's folder (case-insensitive); other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pnm")

HASH_VERSION = b"sparse-caffe-images-v1"


def _skimage_data(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        return getattr(skimage.data, name)()
    return load


def _motorcycle(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        return skimage.data.stereo_motorcycle()[index]
    return load


# The real colour photographs in scikit-image's wheel, in this (fixed) order: name -> loader.
# Left out: chelsea's duplicate `cat`; immunohistochemistry (a stained microscopy slide), retina
# (a fundus photograph) and hubble_deep_field (mostly black sky): real, but far from the natural
# scenes these nets are trained on; colorwheel and logo (graphics); camera, coins, moon, grass,
# gravel, brick, page, text (grey-scale); horse, microaneurysms, lfw_subset (binary, tiny or
# grey); eagle, lily, kidney and the other images skimage fetches from the internet (not shipped).
SHIPPED_PHOTOS: Dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage_data("astronaut"),
    "chelsea": _skimage_data("chelsea"),
    "coffee": _skimage_data("coffee"),
    "rocket": _skimage_data("rocket"),
    "motorcycle_left": _motorcycle(0),    # skimage.data.stereo_motorcycle()[0]
    "motorcycle_right": _motorcycle(1),   # its stereo partner: the same scene, another viewpoint
}


@dataclass(frozen=True)
class RawImage:
    """One image as read: float32 RGB in 0..1, (H, W, 3)."""

    name: str
    source: str  # "skimage:<name>" or the file's absolute path
    rgb: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images for one net: (N, 3, S, S) float32 BGR minus the mean, read-only."""

    net: str
    names: Tuple[str, ...]
    sources: Tuple[str, ...]
    sha256: str  # of the preprocessed batch (shape and float32 bytes): what the net is fed
    data: np.ndarray = field(repr=False, compare=False)

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> dict:
        """JSON-ready identity of the set (everything but the pixels)."""
        return {"net": self.net, "count": self.count, "names": list(self.names),
                "sources": list(self.sources), "sha256": self.sha256,
                "shape": list(self.data.shape)}


def batch_sha256(data: np.ndarray) -> str:
    """Stable hash of a preprocessed batch: its shape and its float32 little-endian bytes."""
    array = np.ascontiguousarray(data, dtype="<f4")
    digest = hashlib.sha256(HASH_VERSION)
    digest.update(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading

def to_float_rgb(array: np.ndarray) -> np.ndarray:
    """An 8-bit image as caffe.io.load_image returns it: float32 RGB in 0..1, (H, W, 3); grey is
    repeated into three channels and an alpha channel dropped."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, np.newaxis], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a grey, RGB or RGBA image, got shape {array.shape}")
    return (array.astype(np.float64) / 255.0).astype(np.float32)


def shipped_photos(count: Optional[int] = None) -> List[RawImage]:
    """The first `count` of SHIPPED_PHOTOS (all if None), read from scikit-image's wheel."""
    available = len(SHIPPED_PHOTOS)
    if count is None:
        count = available
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"the number of images must be a whole number of at least 1, got {count!r}")
    if count > available:
        raise UserError(f"asked for {count} images, but only {available} photographs ship with "
                        f"scikit-image ({', '.join(SHIPPED_PHOTOS)}); give a folder of your own "
                        f"images for more")
    return [RawImage(name, f"skimage:{name}", to_float_rgb(load()))
            for name, load in list(SHIPPED_PHOTOS.items())[:count]]


# Larger images are refused (a warning, and the file is skipped): they are warped to 256 x 256
# anyway, and decoding one costs ~13 bytes a pixel on the way to float32 RGB (25 megapixels, a
# 6000 x 4000 camera picture, about 1 GB at the peak). A larger JPEG is decoded at 1/2 to 1/8
# scale instead (PIL's draft mode), as small as keeps 512 pixels a side.
MAX_PIXELS = 25_000_000


def read_image(path: Path) -> np.ndarray:
    """A file as float32 RGB in 0..1; ValueError with the reason if it is not a readable image.

    16-bit images are scaled to 0..1 from their full 16-bit range (never clipped at 255); an
    image above MAX_PIXELS is refused, or for a JPEG decoded at 1/2, 1/4 or 1/8 scale."""
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            # PIL's own warning for images above its limit; ours is lower and says what to do.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                if image.format != "JPEG":
                    raise ValueError(f"{width} x {height} pixels is more than the "
                                     f"{MAX_PIXELS // 1_000_000} megapixels read; scale it down "
                                     "first (it is warped to 256 x 256 anyway)")
                scale = 2  # the smallest that fits, then smaller while both sides keep 512
                while scale < 8 and (width * height / scale ** 2 > MAX_PIXELS
                                     or min(width, height) / (2 * scale) >= 512):
                    scale *= 2
                image.draft("RGB", (width // scale, height // scale))
                print(f"note: {path}: {width} x {height} pixels, decoded at 1/{scale} scale",
                      file=sys.stderr)
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                return _sixteen_bit_rgb(np.asarray(image))
            # Like caffe.io.load_image: grey repeated, alpha dropped (not composited), palette
            # expanded; no EXIF rotation (Caffe applies none either).
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(reason) from None
    return to_float_rgb(np.asarray(rgb))


def _sixteen_bit_rgb(array: np.ndarray) -> np.ndarray:
    """A 16-bit grey image (PIL mode I;16 or I) as float32 RGB in 0..1, as load_image gives an
    8-bit one (skimage reads 16-bit files the same way: divided by 65535)."""
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError("32-bit integer pixels; save it as an 8- or 16-bit image")
    grey = (array.astype(np.float64) / 65535.0).astype(np.float32)
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def read_folder(folder: Path) -> List[RawImage]:
    """Every image file directly in `folder` (by suffix, sorted by name), read; an unreadable one
    is skipped with a one-line warning on stderr. UserError if the folder is missing, holds no
    image file, or none of them can be read."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise UserError(f"--images {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder; give a folder of image files")
    candidates = sorted(path for path in folder.iterdir()
                        if path.is_file() and not path.name.startswith(".")
                        and path.suffix.lower() in IMAGE_SUFFIXES)
    if not candidates:
        raise UserError(f"--images {folder}: no image files in it (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in candidates:
        try:
            rgb = read_image(path)
        except ValueError as error:
            print(f"warning: skipping {path}: not a readable image ({error})", file=sys.stderr)
            continue
        images.append(RawImage(path.name, str(path.resolve()), rgb))
    if not images:
        raise UserError(f"--images {folder}: none of its {len(candidates)} image files could be "
                        f"read (see the warnings above)")
    return images


def read_images(source: Union[None, int, Path]) -> List[RawImage]:
    """None: all shipped photographs; an int N: the first N of them; a Path: a folder's images."""
    if source is None or isinstance(source, int):
        return shipped_photos(source)
    if isinstance(source, (str, Path)):
        return read_folder(Path(source))
    raise UserError(f"images must be a count or a folder, got {source!r}")


# ----------------------------------------------------------------------------- preprocessing

def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre crop of an (H, W, K) image, with the offsets Classifier.predict computes."""
    height, width = image.shape[:2]
    if size > height or size > width:
        raise ValueError(f"cannot crop {size} x {size} from {height} x {width}")
    top = int(height / 2.0 - size / 2.0)
    left = int(width / 2.0 - size / 2.0)
    return image[top:top + size, left:left + size]


def preprocess(images: List[RawImage], info: NetInfo) -> np.ndarray:
    """float32 (N, 3, S, S) for the net: caffe.io.resize_image to 256 x 256, centre crop,
    caffe.io.Transformer (CHW, BGR, x 255, minus the mean)."""
    _caffe()
    import caffe.io
    size = info.input_size
    transformer = caffe.io.Transformer({"data": (1, 3, size, size)})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_channel_swap("data", (2, 1, 0))
    transformer.set_raw_scale("data", 255.0)
    transformer.set_mean("data", np.asarray(info.mean_bgr, dtype=np.float32))
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for index, image in enumerate(images):
        resized = caffe.io.resize_image(image.rgb, RESIZE_DIMS)
        out[index] = transformer.preprocess("data", centre_crop(resized, size))
    return out


def load_images(net_name: str, source: Union[None, int, Path] = None) -> ImageSet:
    """Images for `net_name`, preprocessed: None = all shipped photographs, an int N = the first
    N of them, a Path = every readable image in that folder (sorted by file name)."""
    info = net_info(net_name)
    raw = read_images(source)
    data = preprocess(raw, info)
    data.setflags(write=False)
    return ImageSet(net=info.name, names=tuple(image.name for image in raw),
                    sources=tuple(image.source for image in raw), sha256=batch_sha256(data),
                    data=data)


def batches(images: ImageSet, batch: int, count: Optional[int] = None) -> Iterator[np.ndarray]:
    """Arrays of exactly `batch` images for a net with that fixed batch size, cycling through the
    set: by default ceil(N / batch) of them (every image at least once; the last is topped up from
    the start); with `count`, that many, the cycle continuing across them."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"the batch size must be a whole number of at least 1, got {batch!r}")
    total = images.count
    if count is None:
        count = -(-total // batch)
    elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UserError(f"the number of batches must be a whole number, got {count!r}")
    for index in range(count):
        start = index * batch
        yield images.data[[(start + i) % total for i in range(batch)]]


def fed_counts(images: ImageSet, batch: int, count: Optional[int] = None) -> List[int]:
    """How many times `batches(images, batch, count)` feeds each image (1 each when batch
    divides N and count is the default)."""
    fed = [0] * images.count
    steps = (-(-images.count // batch) if count is None else count) * batch
    for i in range(steps):
        fed[i % images.count] += 1
    return fed


__all__ = ["SHIPPED_PHOTOS", "RESIZE_DIMS", "IMAGE_SUFFIXES", "RawImage", "ImageSet",
           "batch_sha256", "to_float_rgb", "shipped_photos", "read_image", "read_folder",
           "read_images", "centre_crop", "preprocess", "load_images", "batches", "fed_counts"]
