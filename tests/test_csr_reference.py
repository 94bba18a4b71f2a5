from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sparse_caffe.inside.csr_reference import Geometry, im2col, lowered_csr_from_csr, useful_macs

GEOMETRIES = [
    Geometry(3, 7, 9),
    Geometry(2, 6, 5, pad=(1, 1)),
    Geometry(2, 9, 8, stride=(2, 2), pad=(1, 1)),
    Geometry(3, 8, 10, stride=(2, 1), pad=(2, 0)),
    Geometry(2, 10, 11, dilation=(2, 2), pad=(2, 2)),
    Geometry(4, 5, 6, kernel=(1, 1)),
    Geometry(2, 7, 8, kernel=(1, 1), stride=(2, 2)),
    Geometry(3, 9, 11, kernel=(3, 5), stride=(1, 2), pad=(1, 2)),
    Geometry(2, 8, 10, stride=(2, 2)),  # the last input row and column are dropped
]


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
@pytest.mark.parametrize("zeros", [0.0, 0.6, 1.0])
def test_lowering_the_feature_maps_csr_equals_csr_of_im2col(g, zeros):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((g.channels, g.height, g.width))
    image[rng.random(image.shape) < zeros] = 0.0
    fmap = sp.csr_matrix(image.reshape(g.channels, -1))
    ptr, idx, val = lowered_csr_from_csr(fmap.indptr, fmap.indices, fmap.data, g)
    oracle = sp.csr_matrix(im2col(image, g))
    np.testing.assert_array_equal(ptr, oracle.indptr)
    np.testing.assert_array_equal(idx, oracle.indices)  # sorted within rows, as the C++ needs
    np.testing.assert_array_equal(val, oracle.data)


def test_im2col_reference_on_a_hand_computed_case():
    image = np.arange(9.0).reshape(1, 3, 3)
    lowered = im2col(image, Geometry(1, 3, 3, kernel=(2, 2)))
    np.testing.assert_array_equal(lowered, [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])


def test_useful_macs_counts_products_of_two_nonzeros():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 10)) * (rng.random((6, 10)) < 0.3)
    x = rng.standard_normal((10, 7)) * (rng.random((10, 7)) < 0.5)
    products = sum(1 for m in range(6) for k in range(10) for n in range(7) if w[m, k] and x[k, n])
    assert useful_macs(w, x) == products
    assert useful_macs(np.ones((2, 3)), np.ones((3, 4))) == 2 * 3 * 4
