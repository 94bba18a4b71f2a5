"""A CSR handed over between convolutions is taken only from the blob it was published with.

The registry of sparse_output CSRs is keyed by the top blob's SyncedMemory address and its write
version. When a producer's top is freed (a growing reshape) and another net allocates a blob at the
same address, that blob must never be mistaken for the producer's: versions are drawn from one
process-wide counter, so the stale entry's version cannot come back.
"""
from __future__ import annotations

import numpy as np

from .test_conv_reference import random_input
from .test_forward_paths import paths, sparse_weights  # noqa: F401 - paths is a fixture

SHAPE = (1, 4, 6, 6)  # the input of each net; the producer's output has the same shape
ATTEMPTS = 10


def chain(caffe, prefix):
    """data -> {prefix}p (3x3 pad 1, 4 -> 4 channels, fused ReLU) -> {prefix}c (3x3 pad 1)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(SHAPE)))
    n[f"{prefix}p"] = L.Convolution(n.data, num_output=SHAPE[1], kernel_size=3, pad=1,
                                    fused_relu=True)
    n[f"{prefix}c"] = L.Convolution(n[f"{prefix}p"], num_output=3, kernel_size=3, pad=1)
    return n


def load(net, prefix, seed):
    rng = np.random.default_rng(seed)
    for layer in (f"{prefix}p", f"{prefix}c"):
        net.params[layer][0].data[...] = sparse_weights(rng, net.params[layer][0].data.shape, 0.5)
        net.params[layer][1].data[...] = rng.standard_normal(net.params[layer][1].data.shape)
    net.blobs["data"].data[...] = random_input(rng, SHAPE, 0.3)


def grow(blob, by):
    """A growing reshape: Caffe allocates new memory for the blob's data and diff, frees the old."""
    n, c, h, w = blob.data.shape
    blob.reshape(n, c, h + by, w + by)


def test_a_freed_producers_csr_is_never_taken_by_another_net(caffe, make_net, paths):  # noqa: F811
    # Net A's producer publishes its output's CSR; then growing reshapes free that output's memory
    # while the producer (and its registry entry) lives on. Net B's producer output is then
    # reallocated: with glibc's allocator it lands where A's was (a freed block of that size is the
    # next one handed out). B's producer runs dense, so it publishes nothing, and its first forward
    # gives its output the write count A's had when A published: only an identity that never
    # repeats keeps B's consumer from taking A's stale CSR. B's consumer must equal dense.
    kept = []
    for attempt in range(ATTEMPTS):
        a_prefix, b_prefix = f"stale{attempt}_a_", f"stale{attempt}_b_"
        a = make_net(chain(caffe, a_prefix))
        b = make_net(chain(caffe, b_prefix))
        load(a, a_prefix, seed=2 * attempt)
        load(b, b_prefix, seed=2 * attempt + 1)
        caffe.set_conv_forward_path("sparse_output", f"{a_prefix}p")
        a.forward()
        # Twice: the first reshape's new diff reuses the freed data block; the second frees it.
        grow(a.blobs[f"{a_prefix}p"], 1)
        grow(a.blobs[f"{a_prefix}p"], 2)
        grow(b.blobs[f"{b_prefix}p"], 1)  # B's forward reshapes it back, keeping the memory
        caffe.set_conv_forward_path("dense", f"{b_prefix}p")
        caffe.set_conv_forward_path("sparse_sparse", f"{b_prefix}c")
        got = b.forward()[f"{b_prefix}c"].copy()
        caffe.set_conv_forward_path("dense", f"{b_prefix}c")
        dense = b.forward()[f"{b_prefix}c"].copy()
        np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4,
                                   err_msg=f"attempt {attempt}: B's consumer took a stale CSR")
        kept += [a, b]  # A's entry stays in the registry while A lives
