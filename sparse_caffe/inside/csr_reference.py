"""Reference (pure numpy) of the sparse paths' index logic, for tests and for offline counting.

It mirrors what the C++ in templates/src/caffe/util/sparse_conv.cpp.j2 does: lowering a feature
map's CSR straight into the CSR of its im2col matrix, tap by tap, and counting the multiply-adds
a sparse x sparse product needs. Tests check it against scipy.sparse on dense im2col.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (3, 3)
    pad: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)

    @property
    def out(self) -> tuple[int, int]:
        return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k, p, s, d in zip(
            (self.height, self.width), self.kernel, self.pad, self.stride, self.dilation))

    def tap(self, k: int) -> tuple[int, int, int]:
        """Lowered row k: (input channel, row offset, column offset), as im2col orders rows."""
        kh, kw = self.kernel
        channel, rest = divmod(k, kh * kw)
        i, j = divmod(rest, kw)
        return channel, i * self.dilation[0] - self.pad[0], j * self.dilation[1] - self.pad[1]


def im2col(image: np.ndarray, g: Geometry) -> np.ndarray:
    """Dense lowered matrix (C*KH*KW x OH*OW), written from the definition."""
    oh, ow = g.out
    rows = []
    for k in range(g.channels * g.kernel[0] * g.kernel[1]):
        c, dy, dx = g.tap(k)
        row = np.zeros((oh, ow), image.dtype)
        for oy in range(oh):
            for ox in range(ow):
                y, x = oy * g.stride[0] + dy, ox * g.stride[1] + dx
                if 0 <= y < g.height and 0 <= x < g.width:
                    row[oy, ox] = image[c, y, x]
        rows.append(row.ravel())
    return np.array(rows)


def lowered_csr_from_csr(indptr, indices, data, g: Geometry):
    """CSR (indptr, indices, data) of im2col, from the feature map's CSR (rows = channels,
    columns = y * width + x), without the dense lowered matrix."""
    oh, ow = g.out
    out_ptr, out_idx, out_val = [0], [], []
    for k in range(g.channels * g.kernel[0] * g.kernel[1]):
        c, dy, dx = g.tap(k)
        pos = np.asarray(indices[indptr[c]:indptr[c + 1]])
        val = np.asarray(data[indptr[c]:indptr[c + 1]])
        y, x = pos // g.width - dy, pos % g.width - dx
        keep = (y >= 0) & (x >= 0) & (y % g.stride[0] == 0) & (x % g.stride[1] == 0)
        oy, ox = y // g.stride[0], x // g.stride[1]
        keep &= (oy < oh) & (ox < ow)
        out_idx.extend((oy * ow + ox)[keep].tolist())
        out_val.extend(val[keep].tolist())
        out_ptr.append(len(out_idx))
    return np.array(out_ptr), np.array(out_idx, dtype=int), np.array(out_val)


def useful_macs(w: np.ndarray, x: np.ndarray) -> int:
    """Multiply-adds with both factors nonzero in W (M x K) x X (K x N):
    sum over k of nnz(column k of W) * nnz(row k of X)."""
    return int(np.count_nonzero(w, axis=0) @ np.count_nonzero(x, axis=1))
