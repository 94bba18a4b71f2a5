"""The one walk over a loaded pycaffe net's layers (the TEST phase's, include/exclude applied), in
forward order; and so "the convolution layers of a net", once.

Python-3.6-clean: the Docker image ships it with sparse_caffe.inside.measure.
"""


def layers_of(net, types=None):
    """[(name, layer)] of a caffe.Net in forward order; only the layer types in `types` if given."""
    return [(name, layer) for name, layer in zip(net._layer_names, net.layers)
            if types is None or layer.type in types]


def convolution_names(net):
    """The names of a caffe.Net's Convolution layers, in forward order."""
    return [name for name, _ in layers_of(net, ("Convolution",))]
