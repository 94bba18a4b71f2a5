"""The benchmark's nets (CaffeNet from Caffe's tree, ResNet-50 from net_spec) and the deploy
transform that folds BatchNorm/Scale (and optionally ReLU) into convolutions.

Fold tolerance: folding changes only where float32 rounds (W * a is rounded once, where the
unfolded net rounds the convolution, the BatchNorm and the Scale separately), a few ulp per layer
through ResNet-50's depth; measured, fc1000 moves by about 6e-7 of its largest magnitude. We allow
1e-5 of it, and 1e-5 on the probabilities (a probability moves by no more than the largest logit
change, here ~3e-4 at most). A wrong fold is far outside that: ignoring BatchNorm's stored scale
factor (999.98 on half the layers here) rescales a layer ~30x, and a missing mean or beta shifts
every channel by O(1) of its magnitude. eps (1e-5 against variances of 0.5..2) is too small to
show in ResNet-50, so the small net below has eps 1e-3 against variances of 1e-4..1e-3.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

from sparse_caffe.models import nets, zoo
from sparse_caffe.errors import UserError

RESNET_BLOCKS = [f"{stage}{letter}" for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
                 for letter in "abcdef"[:count]]
RESNET_COUNTS = {"Convolution": 53, "BatchNorm": 53, "Scale": 53, "Eltwise": 16, "ReLU": 49}
# conv1, and branch2a + branch2b of every block: the convolutions a ReLU alone reads.
RESNET_FUSED = 1 + 2 * len(RESNET_BLOCKS)


def layer_types(net_text: str) -> collections.Counter:
    return collections.Counter(layer.type for layer in nets.parse_net(net_text).layer)


def layers_by_name(net_text: str) -> dict:
    return {layer.name: layer for layer in nets.parse_net(net_text).layer}


def sane_weights(net, rng) -> dict[str, list[np.ndarray]]:
    """Seeded random weights that keep ResNet-50's activations O(1..10) for an O(1) input.

    He-initialised convolutions and fc; BatchNorm statistics near what such a layer produces
    (mean ~ N(0, 0.5), variance in 0.5..2), stored with Caffe's scale factor 1.0 or 999.98 on
    alternate layers; Scale gamma in 0.5..1.5 (0.2..0.5 on the residual's branch2c, so sixteen
    additions do not blow up), beta ~ N(0, 0.2).
    """
    types = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    weights = {}
    for index, (name, blobs) in enumerate(net.params.items()):
        shapes = [blob.data.shape for blob in blobs]
        kind = types[name]
        if kind in ("Convolution", "InnerProduct"):
            fan_in = int(np.prod(shapes[0][1:]))
            arrays = [rng.standard_normal(shapes[0]) * np.sqrt(2.0 / fan_in)]
            arrays += [rng.normal(0.0, 0.1, shape) for shape in shapes[1:]]
        elif kind == "BatchNorm":
            factor = 999.98 if index % 2 else 1.0
            arrays = [rng.normal(0.0, 0.5, shapes[0]) * factor,
                      rng.uniform(0.5, 2.0, shapes[1]) * factor, np.full(shapes[2], factor)]
        elif kind == "Scale":
            low, high = (0.2, 0.5) if name.endswith("branch2c") else (0.5, 1.5)
            arrays = [rng.uniform(low, high, shapes[0]), rng.normal(0.0, 0.2, shapes[1])]
        else:
            raise AssertionError(f"no weights planned for {kind} layer {name}")
        weights[name] = [array.astype(np.float32) for array in arrays]
    return weights


def forward(net, x) -> dict[str, np.ndarray]:
    net.blobs["data"].data[...] = x
    net.forward()
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


# ----------------------------------------------------------------------------- the table

def test_unknown_net_names_the_choices():
    with pytest.raises(UserError, match="unknown net 'vgg16': choose one of caffenet, resnet50"):
        nets.net_info("vgg16")
    assert nets.net_info("resnet50").input_size == 224
    assert nets.net_info("caffenet").input_size == 227
    assert all(info.mean_bgr == (104.0, 117.0, 123.0) for info in nets.NETS.values())


def test_batch_must_be_positive(caffe):
    with pytest.raises(UserError, match="batch size"):
        nets.resnet50_deploy(0)


# ----------------------------------------------------------------------------- CaffeNet

@pytest.fixture(scope="module")
def caffe_source(caffe_python_path):
    return caffe_python_path.parent  # <build>/src, Caffe's tree with models/


def test_caffenet_from_caffes_tree(caffe, caffe_source):
    text = zoo.deploy("caffenet", 3, caffe_source)
    assert text == nets.caffenet_deploy(caffe_source, 3)
    net = nets.load_net(text)
    names = list(net._layer_names)
    for name in ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]:
        assert name in names
    assert net.blobs["data"].data.shape == (3, 3, 227, 227)
    layers = layers_by_name(text)
    assert {name: layers[name].convolution_param.group for name in
            ["conv1", "conv2", "conv3", "conv4", "conv5"]} == dict(conv1=1, conv2=2, conv3=1,
                                                                   conv4=2, conv5=2)
    assert net.params["conv2"][0].data.shape == (256, 48, 5, 5)
    assert net.forward()["prob"].shape == (3, 1000)


def test_caffenet_needs_a_caffe_tree(caffe, tmp_path):
    with pytest.raises(UserError, match="is that a Caffe source tree"):
        nets.caffenet_deploy(tmp_path, 1)


# ----------------------------------------------------------------------------- ResNet-50

@pytest.fixture(scope="module")
def resnet(caffe):
    """ResNet-50 at batch 1 with sane weights, an input, and every blob of its forward pass."""
    text = nets.resnet50_deploy(1)
    rng = np.random.default_rng(20240611)
    weights = sane_weights(nets.load_net(text), rng)
    net = nets.load_net(text, weights)
    x = rng.standard_normal(net.blobs["data"].data.shape).astype(np.float32)
    return text, weights, net, x, forward(net, x)


def test_resnet50_layout(resnet):
    text, _, net, _, blobs = resnet
    types = layer_types(text)
    assert {kind: types[kind] for kind in RESNET_COUNTS} == RESNET_COUNTS
    assert set(types) == set(RESNET_COUNTS) | {"Input", "Pooling", "InnerProduct", "Softmax"}
    layers = layers_by_name(text)
    for block in RESNET_BLOCKS:
        branches = ["branch2a", "branch2b", "branch2c"] + (["branch1"] if block[1] == "a" else [])
        for branch in branches:
            conv = layers[f"res{block}_{branch}"]
            # BatchNorm and Scale in place on the convolution's top, as in He's prototxt.
            for layer in [layers[f"bn{block}_{branch}"], layers[f"scale{block}_{branch}"]]:
                assert list(layer.bottom) == list(layer.top) == list(conv.top)
            assert not conv.convolution_param.bias_term
        assert f"res{block}_branch2a_relu" in layers and f"res{block}_relu" in layers
        assert (f"res{block}_branch1" in layers) == (block[1] == "a")
        assert list(layers[f"res{block}"].bottom)[1] == f"res{block}_branch2c"
    assert layers["conv1"].convolution_param.bias_term
    for block, stride in [("2a", 1), ("3a", 2), ("4a", 2), ("5a", 2)]:
        for branch in ["branch1", "branch2a"]:
            assert list(layers[f"res{block}_{branch}"].convolution_param.stride or [1]) == [stride]
    assert net.params["res5c_branch2b"][0].data.shape == (512, 512, 3, 3)
    assert net.params["res2a_branch1"][0].data.shape == (256, 64, 1, 1)
    assert blobs["res3a_branch2a"].shape == (1, 128, 28, 28)
    assert blobs["pool5"].shape == (1, 2048, 1, 1)
    assert blobs["prob"].shape == (1, 1000)
    # He's ResNet-50 has 25,557,032 learned parameters (torchvision's count) plus conv1's bias.
    learned = sum(blob.data.size for name, param in net.params.items()
                  if not name.startswith("bn") for blob in param)
    assert learned == 25_557_032 + 64


def test_resnet50_batch_2(caffe):
    net = nets.load_net(nets.resnet50_deploy(2))
    assert net.blobs["data"].data.shape == (2, 3, 224, 224)
    assert net.forward()["prob"].shape == (2, 1000)


# ----------------------------------------------------------------------------- folding

@pytest.mark.parametrize("fuse_relu", [False, True], ids=["fold", "fold+fuse_relu"])
def test_fold_resnet50_keeps_its_output(resnet, fuse_relu):
    text, weights, _, x, reference = resnet
    original = {name: [blob.copy() for blob in blobs] for name, blobs in weights.items()}
    folded_text, folded_weights = nets.fold_batchnorm(text, weights, fuse_relu=fuse_relu)
    types = layer_types(folded_text)
    assert types["BatchNorm"] == types["Scale"] == 0
    assert types["Convolution"] == 53
    # Every ReLU goes when fused: into its convolution, or into the residual sum before it.
    assert types["ReLU"] == (0 if fuse_relu else 49)
    layers = layers_by_name(folded_text)
    fused = {name for name, layer in layers.items() if layer.convolution_param.fused_relu}
    residual = {name for name, layer in layers.items() if layer.convolution_param.fused_residual}
    # Fused, every residual sum (with its ReLU) goes into the branch2c convolution feeding it:
    # the later of res2a's two (branch1 runs first, so its output is the residual).
    assert types["Eltwise"] == (0 if fuse_relu else 16)
    assert residual == ({f"res{block}_branch2c" for block in RESNET_BLOCKS} if fuse_relu else set())
    assert len(fused) == (RESNET_FUSED + 16 if fuse_relu else 0)
    if fuse_relu:
        assert "conv1" in fused and "res4c_branch2b" in fused and residual <= fused
        assert "res2a_branch1" not in fused  # it feeds the sum as the residual
        assert list(layers["res2a_branch2c"].bottom) == ["res2a_branch2b", "res2a_branch1"]
        assert list(layers["res2b_branch2c"].bottom) == ["res2b_branch2b", "res2a"]
        assert list(layers["res2b_branch2c"].top) == ["res2b"]
    assert all(layer.convolution_param.bias_term for layer in layers.values()
               if layer.type == "Convolution")
    assert not any(name.startswith(("bn", "scale")) for name in folded_weights)
    # The inputs are untouched.
    assert all(np.array_equal(a, b)
               for name in weights for a, b in zip(weights[name], original[name]))
    got = forward(nets.load_net(folded_text, folded_weights), x)
    scale = np.abs(reference["fc1000"]).max()
    np.testing.assert_allclose(got["fc1000"], reference["fc1000"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got["prob"], reference["prob"], rtol=0, atol=1e-5)
    # Not vacuous: the net is far from constant and the softmax is not saturated.
    assert reference["fc1000"].std() > 1 and reference["prob"].max() < 0.99


def small_net(caffe):
    """conv -> BatchNorm -> Scale -> ReLU with tops that are not in place; conv2 -> BatchNorm
    (stored scale factor 0) in place; conv3, whose output an Eltwise also reads (not foldable);
    the Eltwise SUM's in-place ReLU (fused into the sum); conv4 -> BatchNorm with batch
    statistics (not foldable)."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.c1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    n.bn1 = L.BatchNorm(n.c1, eps=1e-3)
    n.sc1 = L.Scale(n.bn1, bias_term=True)
    n.relu1 = L.ReLU(n.sc1, in_place=True)
    n.c2 = L.Convolution(n.relu1, num_output=4, kernel_size=1, bias_term=False)
    n.bn2 = L.BatchNorm(n.c2, in_place=True)
    n.c3 = L.Convolution(n.bn2, num_output=4, kernel_size=1, bias_term=False)
    n.bn3 = L.BatchNorm(n.c3)
    n.sum = L.Eltwise(n.c3, n.bn3, operation=P.Eltwise.SUM)
    n.relu_sum = L.ReLU(n.sum, in_place=True)
    n.c4 = L.Convolution(n.relu_sum, num_output=4, kernel_size=1)
    n.bn4 = L.BatchNorm(n.c4, use_global_stats=False, in_place=True)
    return str(n.to_proto())


def small_weights(net, rng):
    weights = {}
    for name, blobs in net.params.items():
        shapes = [blob.data.shape for blob in blobs]
        if name.startswith("bn"):
            factor = {"bn1": 999.98, "bn2": 0.0}.get(name, 1.0)
            low, high = (1e-4, 1e-3) if name == "bn1" else (0.5, 2.0)  # bn1: eps 1e-3 matters
            var = rng.uniform(low, high, shapes[1])
            arrays = [rng.normal(0, 0.5, shapes[0]) * (factor or 1), var * (factor or 1),
                      np.full(shapes[2], factor)]
        else:
            first = (rng.uniform(0.5, 1.5, shapes[0]) if name.startswith("sc")
                     else rng.standard_normal(shapes[0]))
            arrays = [first] + [rng.normal(0, 0.3, shape) for shape in shapes[1:]]
        weights[name] = [array.astype(np.float32) for array in arrays]
    return weights


def fold_small(text, seed, shape, fuse_relu):
    """A small net with random weights, folded: (its blobs on a random input before folding, the
    folded text and weights, that input)."""
    rng = np.random.default_rng(seed)
    weights = small_weights(nets.load_net(text), rng)
    x = rng.standard_normal(shape).astype(np.float32)
    reference = forward(nets.load_net(text, weights), x)
    folded_text, folded_weights = nets.fold_batchnorm(text, weights, fuse_relu=fuse_relu)
    return reference, folded_text, folded_weights, x


def assert_blobs_kept(got, reference, blobs):
    for blob in blobs:
        scale = np.abs(reference[blob]).max()
        np.testing.assert_allclose(got[blob], reference[blob], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["fold", "fold+fuse_relu"])
def test_fold_rewires_and_leaves_what_it_cannot_fold(caffe, fuse_relu):
    reference, folded_text, folded_weights, x = fold_small(small_net(caffe), 7, (2, 3, 8, 8),
                                                           fuse_relu)
    layers = layers_by_name(folded_text)
    relu, relu_sum = ([], []) if fuse_relu else (["relu1"], ["relu_sum"])
    assert list(layers) == ["data", "c1", *relu, "c2", "c3", "bn3", "sum", *relu_sum, "c4", "bn4"]
    assert layers["sum"].eltwise_param.fused_relu == fuse_relu
    assert list(layers["c1"].top) == ["sc1"]  # writes what the Scale wrote; the ReLU and c2 read it
    assert layers["c1"].convolution_param.fused_relu == fuse_relu
    assert layers["c2"].convolution_param.bias_term  # folded, with no ReLU after it to fuse
    assert not layers["c2"].convolution_param.fused_relu
    assert sorted(folded_weights) == ["bn3", "bn4", "c1", "c2", "c3", "c4"]
    assert [len(folded_weights[name]) for name in ["c1", "c2", "c3"]] == [2, 2, 1]
    got = forward(nets.load_net(folded_text, folded_weights), x)
    assert_blobs_kept(got, reference, ["sc1", "c2", "sum", "c4"])


def residual_net(caffe):
    """ResNet's two residual sums (a projection shortcut, then an identity one), and three the
    transform must leave: coefficients other than 1, a sum in place on the convolution's output,
    and a convolution whose output something else also reads."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 4, 6, 6]))
    n.short = L.Convolution(n.data, num_output=6, kernel_size=1)
    n.a = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    n.relu_a = L.ReLU(n.a, in_place=True)
    n.b = L.Convolution(n.a, num_output=6, kernel_size=1)
    n.sum1 = L.Eltwise(n.short, n.b, operation=P.Eltwise.SUM)
    n.relu1 = L.ReLU(n.sum1, in_place=True)
    n.c = L.Convolution(n.sum1, num_output=6, kernel_size=3, pad=1)
    n.sum2 = L.Eltwise(n.c, n.sum1)
    n.d = L.Convolution(n.sum2, num_output=6, kernel_size=1)
    n.scaled = L.Eltwise(n.d, n.sum2, coeff=[1, 2])
    n.e = L.Convolution(n.scaled, num_output=6, kernel_size=1)
    n.inplace = L.Eltwise(n.e, n.scaled)
    n.f = L.Convolution(n.inplace, num_output=6, kernel_size=1)
    n.shared = L.Eltwise(n.f, n.inplace)
    n.g = L.Convolution(n.f, num_output=6, kernel_size=1)
    proto = n.to_proto()
    for layer in proto.layer:  # the sum `inplace` writes its first bottom, e, in place
        layer.top[:] = ["e" if top == "inplace" else top for top in layer.top]
        layer.bottom[:] = ["e" if bottom == "inplace" else bottom for bottom in layer.bottom]
    return str(proto)


def test_fold_moves_residual_sums_into_their_convolutions(caffe):
    reference, folded_text, folded_weights, x = fold_small(residual_net(caffe), 5, (2, 4, 6, 6),
                                                           True)
    layers = layers_by_name(folded_text)
    assert list(layers) == ["data", "short", "a", "b", "c", "d", "scaled", "e", "inplace", "f",
                            "shared", "g"]
    b, c = layers["b"].convolution_param, layers["c"].convolution_param
    assert list(layers["b"].bottom) == ["a", "short"] and list(layers["b"].top) == ["sum1"]
    assert b.fused_residual and b.fused_relu  # the sum's ReLU follows it into the convolution
    assert list(layers["c"].bottom) == ["sum1", "sum1"] and list(layers["c"].top) == ["sum2"]
    assert c.fused_residual and not c.fused_relu
    assert not any(layers[name].convolution_param.fused_residual for name in "defg")
    got = forward(nets.load_net(folded_text, folded_weights), x)
    assert_blobs_kept(got, reference, ["sum1", "sum2", "scaled", "e", "g"])


@pytest.mark.parametrize("text, message", [
    ("layer { nme: 'x' }", "not a valid Caffe NetParameter: .*nme"),
    ("this is not a net", "not a valid Caffe NetParameter"),
    ("", "the net has no layers"),
    ("layers { name: 'x' type: CONVOLUTION }", "old V1 'layers' format"),
])
def test_fold_refuses_what_is_not_a_net(caffe, text, message):
    with pytest.raises(UserError, match=message):
        nets.fold_batchnorm(text, {})


def test_fold_needs_the_weights(caffe):
    with pytest.raises(UserError, match="no weights for layer 'c1'"):
        nets.fold_batchnorm(small_net(caffe), {})


def test_load_net_checks_the_weights(caffe):
    text = small_net(caffe)
    weights = nets.net_weights(nets.load_net(text))
    assert nets.net_weights(nets.load_net(text, weights)).keys() == weights.keys()
    with pytest.raises(UserError, match=r"no weights for \['c1'\]"):
        nets.load_net(text, {name: blobs for name, blobs in weights.items() if name != "c1"})
    weights["c2"] = [np.zeros((4, 4, 3, 3), np.float32)]
    with pytest.raises(UserError, match=r"blob 0 of layer 'c2' has shape \(4, 4, 1, 1\)"):
        nets.load_net(text, weights)
