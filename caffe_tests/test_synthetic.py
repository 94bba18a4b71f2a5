"""The offline default model (synthetic weights, calibrated on real photographs), the images'
Caffe preprocessing, and the sparsity report, against the patched build.

Each synthetic model is built once per session into a session tmp folder (ResNet-50 ~10 s,
CaffeNet ~5 s on 2 cores); determinism and damage tests build CaffeNet again elsewhere.

Input-sparsity tolerance: calibration sets each site's threshold midway between two neighbouring
values, so the count of zeros on the calibration images is exact unless values tie at the threshold
(max pooling copies one value into overlapping windows: CaffeNet's pool5 lands 0.03 points off) or
float32 rounding in Caffe moves a value across it; we allow 0.25 percentage points. A wrong
calibration (per-layer instead of per-channel thresholds, a stage off, the pre-pool blob) is
off by several points.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from sparse_caffe.models import images
from sparse_caffe.inside import sparsity
from sparse_caffe.models import nets
from sparse_caffe.models import pruning, synthetic
from sparse_caffe.errors import UserError

INPUT_TOLERANCE = 0.0025  # fraction of zeros (0.25 percentage points)
WEIGHT_TOLERANCE_PCT = 0.1


@pytest.fixture(scope="session")
def caffe_source(caffe, caffe_python_path):
    return caffe_python_path.parent  # <build>/src/python -> <build>/src, Caffe's tree


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="session")
def calibration_images(caffe):
    return {net: images.load_images(net) for net in ("caffenet", "resnet50")}


@pytest.fixture(scope="session")
def models(caffe, caffe_source, cache_root, calibration_images):
    return {net: synthetic.synthetic_model(net, cache_root, images=calibration_images[net],
                                           caffe_source=caffe_source)
            for net in ("caffenet", "resnet50")}


def reload(caffe, model):
    """The way real weights are loaded: caffe.Net(deploy prototxt, caffemodel, TEST)."""
    return caffe.Net(str(model.prototxt), str(model.path), caffe.TEST)


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("net, size", [("caffenet", 227), ("resnet50", 224)])
def test_shipped_photos_preprocess_to_the_nets_input(calibration_images, net, size):
    imageset = calibration_images[net]
    assert imageset.data.shape == (6, 3, size, size) and imageset.data.dtype == np.float32
    assert imageset.names[0] == "astronaut" and imageset.sources[0] == "skimage:astronaut"
    assert not imageset.data.flags.writeable
    assert imageset.sha256 == images.batch_sha256(imageset.data)
    assert -124 <= imageset.data.min() and imageset.data.max() <= 152  # 0..255 minus the mean


def test_preprocessing_is_bvlc_classifiers(calibration_images):
    """Independently: skimage's resize (what caffe.io.resize_image calls) to 256 x 256, the centre
    crop, RGB -> BGR, x 255, minus the BGR mean."""
    import skimage.data
    from skimage.transform import resize
    rgb = skimage.data.astronaut() / 255.0
    resized = resize(rgb, (256, 256), order=1, mode="constant")
    crop = resized[14:241, 14:241]
    mean = np.array([104, 117, 123])[:, None, None]
    expected = crop[:, :, ::-1].transpose(2, 0, 1) * 255.0 - mean
    np.testing.assert_allclose(calibration_images["caffenet"].data[0], expected, atol=2e-3)


@pytest.mark.parametrize("net, centre", [("caffenet", 114), ("resnet50", 112)])
def test_bgr_order_and_mean_on_a_known_pixel(caffe, tmp_path, net, centre):
    from PIL import Image
    picture = np.full((256, 256, 3), 128, np.uint8)
    picture[126:131, 126:131] = (10, 200, 30)  # RGB
    Image.fromarray(picture).save(tmp_path / "known.png")
    imageset = images.load_images(net, tmp_path)
    assert imageset.names == ("known.png",)
    # Input pixel (128, 128) lands at the crop's (centre, centre); channels come out B, G, R.
    np.testing.assert_allclose(imageset.data[0, :, centre, centre],
                               [30 - 104, 200 - 117, 10 - 123], atol=1e-3)
    np.testing.assert_allclose(imageset.data[0, :, 0, 0], [128 - 104, 128 - 117, 128 - 123],
                               atol=1e-3)


def test_folder_of_images_with_an_unreadable_one(caffe, tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png"):  # synthetic noise pictures: only shapes and order matter here
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "c.jpg").write_bytes(b"garbage")
    imageset = images.load_images("resnet50", tmp_path)
    assert imageset.names == ("a.png", "b.png")
    assert imageset.sources == tuple(str((tmp_path / n).resolve()) for n in ("a.png", "b.png"))
    assert imageset.data.shape == (2, 3, 224, 224)
    assert capsys.readouterr().err.count("warning: skipping") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no image files"):
        images.load_images("resnet50", empty)
    with pytest.raises(UserError, match="no such folder"):
        images.load_images("resnet50", tmp_path / "missing")


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("net", ["caffenet", "resnet50"])
def test_weight_sparsity_is_skimcaffes_table(caffe, models, net):
    model = models[net]
    loaded = reload(caffe, model)
    table = synthetic.WEIGHT_SPARSITY[net]
    kinds = dict(zip(loaded._layer_names, (layer.type for layer in loaded.layers)))
    checked = 0
    for name, blobs in loaded.params.items():
        if kinds[name] not in ("Convolution", "InnerProduct"):
            continue
        zeros = 100.0 * float((blobs[0].data == 0).sum()) / blobs[0].data.size
        expected = table.get(name, 0.0)  # unlisted: unpruned (ResNet-50's conv1 and 1x1 convs)
        assert zeros == pytest.approx(expected, abs=WEIGHT_TOLERANCE_PCT), name
        assert model.weight_zeros_pct[name] == pytest.approx(zeros), name
        checked += 1
    assert checked == (8 if net == "caffenet" else 54)
    assert set(table) <= set(model.weight_zeros_pct)


def test_pruning_is_exact_and_by_magnitude():
    weights = synthetic.he_normal((64, 32, 3, 3), seed=3, index=1)
    pruned = pruning.prune_blob(weights, 0.9747)
    assert int((pruned == 0).sum()) == round(0.9747 * weights.size)
    kept = np.abs(weights[pruned != 0])
    assert kept.min() >= np.abs(weights[pruned == 0]).max()
    np.testing.assert_array_equal(pruned[pruned != 0], weights[pruned != 0])


# ----------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("net", ["caffenet", "resnet50"])
def test_input_sparsity_follows_the_profile(caffe, models, calibration_images, net):
    model = models[net]
    loaded = reload(caffe, model)
    loaded.blobs["data"].data[...] = calibration_images[net].data
    loaded.forward()
    measured = synthetic.measured_sparsity(loaded)
    convs = [name for name, layer in zip(loaded._layer_names, loaded.layers)
             if layer.type == "Convolution"]
    assert convs[0] == "conv1" and "conv1" not in model.target_input_zeros
    for name in convs[1:]:  # every convolution after the first reads a calibrated site
        target = model.target_input_zeros[name]
        assert measured[name] == pytest.approx(target, abs=INPUT_TOLERANCE), name
    # the file holds exactly what was calibrated
    assert measured == pytest.approx(model.input_zeros, abs=1e-9)
    targets = list(model.targets.values())
    assert targets[0] == pytest.approx(0.26) and targets[-1] == pytest.approx(0.73)
    assert np.all(np.diff(targets) >= 0)  # the default rises with depth


def test_resnet_profile_by_stage_and_activations_stay_order_one(caffe, models, calibration_images):
    model = models["resnet50"]
    loaded = reload(caffe, model)
    loaded.blobs["data"].data[...] = calibration_images["resnet50"].data
    loaded.forward()
    for blob in ("pool1", "res2c", "res3d", "res4f", "res5c", "fc1000"):
        assert 0.3 < float(loaded.blobs[blob].data.std()) < 3.0, blob
    stages = {site.blob: site.stage for site in synthetic.sites(nets.resnet50_deploy(1))}
    assert len(stages) == 49 and stages["pool1"] == "conv1" and stages["res5c"] == "res5"
    assert np.mean(list(model.targets.values())) == pytest.approx(0.48, abs=0.01)


def test_model_loads_in_a_net_of_any_batch_size(caffe, models, calibration_images, tmp_path):
    model = models["resnet50"]
    prototxt = tmp_path / "resnet50-batch1.prototxt"
    prototxt.write_text(nets.resnet50_deploy(1))
    single = caffe.Net(str(prototxt), str(model.path), caffe.TEST)
    single.blobs["data"].data[...] = calibration_images["resnet50"].data[:1]
    single.forward()
    batch = reload(caffe, model)
    batch.blobs["data"].data[...] = calibration_images["resnet50"].data
    batch.forward()
    np.testing.assert_allclose(single.blobs["fc1000"].data[0], batch.blobs["fc1000"].data[0],
                               rtol=1e-4, atol=1e-4)


def test_a_stage_profile_and_its_errors(caffe, caffe_source):
    net_sites = synthetic.sites(nets.caffenet_deploy(caffe_source, 1))
    assert [s.stage for s in net_sites] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6",
                                            "fc7"]
    assert [s.blob for s in net_sites] == ["norm1", "norm2", "conv3", "conv4", "pool5", "fc6",
                                           "fc7"]
    stages = {s.stage: 0.5 for s in net_sites}
    assert set(synthetic.resolve_profile(stages, net_sites).values()) == {0.5}
    with pytest.raises(UserError, match=r"missing \['fc7'\]"):
        synthetic.resolve_profile({k: v for k, v in stages.items() if k != "fc7"}, net_sites)
    with pytest.raises(UserError, match=r"unknown \['res9'\]"):
        synthetic.resolve_profile({**stages, "res9": 0.5}, net_sites)
    with pytest.raises(UserError, match="give fractions from 0 to 0.99"):
        synthetic.resolve_profile(lambda depth: 1.5, net_sites)
    constant = synthetic.resolve_profile(synthetic.DepthProfile(((0, 0.4), (1, 0.4))), net_sites)
    assert set(constant.values()) == {0.4}


def test_max_pool_matches_caffes_rounding_up(caffe, make_net):
    rng = np.random.default_rng(1)
    for size, kernel, stride, pad in ((13, 3, 2, 0), (55, 3, 2, 0), (10, 3, 2, 1), (7, 2, 2, 0)):
        n = caffe.NetSpec()
        n.data = caffe.layers.Input(shape=dict(dim=[2, 3, size, size]))
        n.pool = caffe.layers.Pooling(n.data, pool=caffe.params.Pooling.MAX, kernel_size=kernel,
                                      stride=stride, pad=pad)
        net = make_net(n)
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        net.blobs["data"].data[...] = x
        net.forward()
        np.testing.assert_array_equal(synthetic.max_pool(x, kernel, stride, pad),
                                      net.blobs["pool"].data)


# ----------------------------------------------------------------------------- files and cache

def test_descriptor_says_synthetic_everywhere(models, cache_root):
    for net, model in models.items():
        assert model.synthetic is True and model.kind == "synthetic" and model.net == net
        assert "synthetic" in model.path.name and model.path.parent == cache_root / "synthetic"
        assert model.path.name.endswith(f"-v{synthetic.CODE_VERSION}.caffemodel")
        assert f"seed{model.seed}" in model.path.name
        sidecar = json.loads(model.path.with_suffix(".json").read_text())
        assert sidecar["synthetic"] is True and sidecar["sha256"] == model.sha256
        assert sparsity.weights_identity(model.path)["kind"] == "synthetic"
        assert model.images == tuple(f"skimage:{n}" for n in images.SHIPPED_PHOTOS)
        print(f"{net}: built in {model.build_seconds} s")


def test_cache_is_reused_without_rebuilding(caffe, models, cache_root, calibration_images,
                                            caffe_source, monkeypatch):
    model = models["caffenet"]
    stamp = model.path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a model the cache holds")

    monkeypatch.setattr(synthetic, "_build", no_build)
    again = synthetic.synthetic_model("caffenet", cache_root, images=calibration_images["caffenet"],
                                      caffe_source=caffe_source)
    assert again == model and model.path.stat().st_mtime_ns == stamp
    assert not [p for p in model.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_bytes_other_seed_other_file_damage_rebuilt(
        caffe, models, tmp_path, calibration_images, caffe_source):
    model = models["caffenet"]
    build = dict(images=calibration_images["caffenet"], caffe_source=caffe_source)
    twin = synthetic.synthetic_model("caffenet", tmp_path / "a", **build)
    assert twin.sha256 == model.sha256 and twin.path.name == model.path.name
    # damaged after it was made: found by its SHA-256, made again, the same bytes
    with open(twin.path, "ab") as f:
        f.write(b"\0")
    assert synthetic.cached_synthetic(twin.path) is None
    assert sparsity.weights_identity(twin.path)["kind"] == "unverified"
    assert synthetic.synthetic_model("caffenet", tmp_path / "a", **build).sha256 == model.sha256
    other = synthetic.synthetic_model("caffenet", tmp_path / "a", seed=1, **build)
    assert other.path != model.path and other.sha256 != model.sha256
    assert "seed1" in other.path.name


def test_profiles_resolve_apart_and_images_must_fit_the_net(caffe, caffe_source, tmp_path,
                                                           calibration_images):
    """A profile goes into the file name through its resolved targets, decided before anything
    is built (ResNet-50 is not built twice here)."""
    text = nets.resnet50_deploy(1)
    a = synthetic.resolve_profile(None, synthetic.sites(text))
    b = synthetic.resolve_profile(lambda depth: 0.5, synthetic.sites(text))
    assert a != b
    with pytest.raises(UserError, match="preprocessed for caffenet, not resnet50"):
        synthetic.synthetic_model("resnet50", tmp_path, images=calibration_images["caffenet"],
                                  caffe_source=caffe_source)


# ----------------------------------------------------------------------------- the report

def test_inspect_synthetic_caffenet(caffe, models, calibration_images, caffe_source, tmp_path):
    model = models["caffenet"]
    imageset = calibration_images["caffenet"]
    rows = sparsity.layer_rows("caffenet", model.path, imageset, 3, caffe_source=caffe_source)
    assert [row.name for row in rows] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    conv2 = rows[1]
    assert (conv2.num_output, conv2.channels_per_group, conv2.kernel_h, conv2.kernel_w,
            conv2.group, conv2.stride, conv2.pad, conv2.input_hw, conv2.output_hw) == \
        (256, 48, 5, 5, 2, (1, 1), (2, 2), (27, 27), (27, 27))
    assert rows[0].stride == (4, 4) and rows[0].input_hw == (227, 227)
    for row in rows:
        table = synthetic.WEIGHT_SPARSITY["caffenet"]
        assert row.weight_zeros_pct == pytest.approx(table[row.name], abs=WEIGHT_TOLERANCE_PCT)
        assert 0 < row.useful_macs <= row.dense_macs
        assert row.images == imageset.count  # 3 divides 6: each image once
        assert row.dense_macs == row.num_output * row.channels_per_group * row.kernel_h * \
            row.kernel_w * row.output_hw[0] * row.output_hw[1]
        if row.name != "conv1":
            assert row.input_zeros_pct / 100 == pytest.approx(model.target_input_zeros[row.name],
                                                              abs=INPUT_TOLERANCE)
    assert rows[0].input_zeros_pct < 1.0
    # weights 85.65% zero and inputs ~26% zero: far less useful work than dense
    assert rows[1].useful_macs < 0.2 * rows[1].dense_macs

    meta = sparsity.make_meta("caffenet", model.path, imageset, 3)
    assert meta["weights"]["synthetic"] is True and meta["weights"]["sha256"] == model.sha256
    assert meta["images"]["sha256"] == imageset.sha256 and meta["images"]["fed"] == [1] * 6
    data = sparsity.to_json(rows, meta)
    text = json.dumps(data)
    back_rows, back_meta = sparsity.from_json(json.loads(text))
    assert back_rows == rows and back_meta == meta
    assert data["totals"]["useful_macs"] <= data["totals"]["dense_macs"]

    table = sparsity.format_table(rows)
    assert all(row.name in table for row in rows) and table.splitlines()[-1].startswith("total")

    # a copy of the same bytes has no sidecar: the report does not guess what it is
    stranger = tmp_path / "copy.caffemodel"
    shutil.copyfile(model.path, stranger)
    assert sparsity.weights_identity(stranger) == {"path": str(stranger.resolve()),
                                                  "sha256": model.sha256, "kind": "unverified",
                                                  "synthetic": None}


def test_inspect_resnet_counts_every_convolution(caffe, models, calibration_images, caffe_source):
    rows = sparsity.layer_rows("resnet50", models["resnet50"].path, calibration_images["resnet50"], 6,
                           caffe_source=caffe_source)
    assert len(rows) == 53
    by_name = {row.name: row for row in rows}
    assert by_name["res5c_branch2b"].weight_zeros_pct == pytest.approx(97.92, abs=0.1)
    assert by_name["res3a_branch2a"].stride == (2, 2)
    assert all(row.useful_macs <= row.dense_macs for row in rows)
    total_dense = sum(row.dense_macs for row in rows)
    assert 3.8e9 < total_dense < 3.9e9  # ResNet-50's ~3.86 GMAC of convolutions per image


def test_inspect_refuses_missing_weights_and_other_nets_images(caffe, calibration_images, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sparsity.layer_rows("caffenet", tmp_path / "none.caffemodel", calibration_images["caffenet"], 1)
    with pytest.raises(UserError, match="preprocessed for resnet50, not caffenet"):
        sparsity.layer_rows("caffenet", tmp_path / "none.caffemodel", calibration_images["resnet50"], 1)


def test_default_caffe_source_is_the_builds_tree(caffe, caffe_source):
    assert synthetic.caffe_source_of_pycaffe() == caffe_source.resolve()
    assert (caffe_source / nets.CAFFENET_DEPLOY).is_file()
    assert os.environ.get("SPARSE_CAFFE_BUILD")
