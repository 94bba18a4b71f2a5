"""The built pycaffe threads its BLAS with Caffe's own OpenMP runtime (one thread pool), and the
benchmark's check refuses anything else."""
from __future__ import annotations

from pathlib import Path

import pytest

from sparse_caffe.inside import measure
from sparse_caffe.errors import UserError


def test_pycaffe_loads_a_blas_threaded_with_gnu_openmp(caffe, make_net):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 8, 9, 9]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=3, weight_filler=dict(type="gaussian"))
    net = make_net(n)
    info = measure.checked_blas_runtime(net, threads=2)  # a dense forward first (MKL loads lazily)
    runtimes = [Path(p).name for p in info["openmp_runtimes"]]
    assert len(runtimes) == 1 and runtimes[0].startswith("libgomp"), info
    if info["name"] == "openblas":
        assert info["threading"] == "openmp", info
        assert "openblas-openmp" in info["library"], info  # Debian's OpenMP build, linked by name
    else:
        assert info["name"] == "mkl" and info["threading"] == "gnu", info


@pytest.mark.parametrize("info, threads, message", [
    ({"name": "openblas", "library": "/x/libopenblas.so.0", "threading": "pthreads",
      "openmp_runtimes": ["/x/libgomp.so.1"]}, 2, "threads with pthreads"),
    ({"name": "openblas", "library": "/x/libopenblas.so.0", "threading": "sequential",
      "openmp_runtimes": ["/x/libgomp.so.1"]}, 2, "threads with sequential"),
    ({"name": "mkl", "library": "/x/libmkl_rt.so.3", "threading": "intel",
      "openmp_runtimes": ["/x/libgomp.so.1"]}, 2, "MKL_THREADING_LAYER=GNU"),
    ({"name": "mkl", "library": "/x/libmkl_rt.so.3", "threading": "gnu",
      "openmp_runtimes": ["/x/libgomp.so.1", "/x/libiomp5.so"]}, 1, "two OpenMP runtimes"),
])
def test_check_refuses_a_second_thread_pool(info, threads, message):
    with pytest.raises(UserError, match=message):
        measure.check_blas_runtime(info, threads)


def test_check_accepts_one_thread_pool():
    measure.check_blas_runtime({"name": "openblas", "library": "x", "threading": "openmp",
                                "openmp_runtimes": ["/x/libgomp.so.1"]}, 2)
    # one thread: no pool to fight over
    measure.check_blas_runtime({"name": "openblas", "library": "x", "threading": "pthreads",
                                "openmp_runtimes": ["/x/libgomp.so.1"]}, 1)
