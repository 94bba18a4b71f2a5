"""Magnitude pruning with one rounding rule, and SkimCaffe's per-layer sparsity, once.

Every pruned blob in the project (the synthetic models, open_nsfw pruned to SkimCaffe's profile,
bench-layer's synthetic layer) goes through prune_blob: for a blob of n entries,
zero_count(n, fraction) = floor(fraction * n + 0.5) entries of least magnitude become zero, ties
broken by position (the earlier flat index first); entries that were zero already count.

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import math
from types import MappingProxyType
from typing import Mapping

import numpy as np

# SkimCaffe's published per-layer weight sparsity (% of weights that are zero) of its pruned
# CaffeNet (top-1 57.48%) and ResNet-50 (top-1 72.84%), the models weights.SKIMCAFFE fetches.
# ResNet-50: only the sixteen 3x3 branch2b convolutions and fc1000 are pruned there; its conv1 and
# 1x1 convolutions (0.2-1.8% zeros in SkimCaffe's model) are not listed, and stay unpruned.
SKIMCAFFE_SPARSITY_PERCENT: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "caffenet": MappingProxyType({
        "conv1": 0.2, "conv2": 85.65, "conv3": 93.1, "conv4": 91.81, "conv5": 88.49,
        "fc6": 90.28, "fc7": 84.37, "fc8": 73.82,
    }),
    "resnet50": MappingProxyType({
        "res2a_branch2b": 88.00, "res2b_branch2b": 83.97, "res2c_branch2b": 80.79,
        "res3a_branch2b": 91.76, "res3b_branch2b": 91.91, "res3c_branch2b": 95.50,
        "res3d_branch2b": 91.13,
        "res4a_branch2b": 96.55, "res4b_branch2b": 97.47, "res4c_branch2b": 97.15,
        "res4d_branch2b": 96.76, "res4e_branch2b": 96.84, "res4f_branch2b": 96.84,
        "res5a_branch2b": 97.78, "res5b_branch2b": 98.03, "res5c_branch2b": 97.92,
        "fc1000": 91.51,
    }),
})


def zero_count(size: int, fraction: float) -> int:
    """How many of `size` entries prune_blob zeroes for `fraction`: floor(fraction * size + 0.5)."""
    return min(size, int(math.floor(fraction * size + 0.5)))


def prune_blob(blob: np.ndarray, fraction: float) -> np.ndarray:
    """A copy of `blob` with zero_count(size, fraction) of its least-magnitude entries zeroed."""
    pruned = np.array(blob, copy=True)
    flat = pruned.reshape(-1)
    count = zero_count(flat.size, fraction)
    if count:
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:count]] = 0
    return pruned
