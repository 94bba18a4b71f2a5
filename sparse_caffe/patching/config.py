"""The data model: what is pinned, what is rendered, what is built. Frozen, validated here, nowhere else."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = PROJECT_ROOT / "templates"
PATCHES_DIR = PROJECT_ROOT / "patches"

# The command that regenerates patches/; written into every generated file's header.
RENDER_COMMAND = "./inv render"


@dataclass(frozen=True)
class CaffePin:
    """The one upstream Caffe this project patches, and how each route to it is verified."""

    commit: str = "99bd99795dcdf0b1d3086a8d67ab1782a8a08383"
    debian_package: str = "caffe"
    debian_version: str = "1.0.0+git20180821.99bd997-8"
    debian_suite: str = "bullseye"
    # SHA-256 of the three files of Debian's source package.
    debian_files: tuple[tuple[str, str], ...] = (
        ("caffe_1.0.0+git20180821.99bd997-8.dsc",
         "c492f4893fc1ba1fb514b2d9b4763bc78dc93571ea24adc6e604eccbb93cdd64"),
        ("caffe_1.0.0+git20180821.99bd997.orig.tar.gz",
         "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"),
        ("caffe_1.0.0+git20180821.99bd997-8.debian.tar.xz",
         "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21"),
    )
    # Hash of the unpacked tree's contents (see source.tree_sha256): the same for Debian's orig
    # tarball and for GitHub's tarball of `commit`, so it verifies every route.
    tree_sha256: str = "e51d2c7b2d036d7a5a727f1371d130ca5867c7ce9e606e503cbd007bcfe0c49b"

    @property
    def github_tarball_url(self) -> str:
        return f"https://github.com/BVLC/caffe/archive/{self.commit}.tar.gz"

    @property
    def orig_tarball(self) -> str:
        return next(name for name, _ in self.debian_files if name.endswith(".orig.tar.gz"))

    @property
    def debian_tarball(self) -> str:
        return next(name for name, _ in self.debian_files if name.endswith(".debian.tar.xz"))


BLAS_CHOICES = ("openblas", "mkl")


@dataclass(frozen=True)
class BuildOptions:
    """What a user chooses for one build; everything else that goes into a build is derived."""

    blas: str = "openblas"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 2)

    def __post_init__(self) -> None:
        if self.blas not in BLAS_CHOICES:
            raise UserError(f"unknown BLAS {self.blas!r}: choose one of {', '.join(BLAS_CHOICES)}")
        if self.jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {self.jobs}")


@dataclass(frozen=True)
class SimdIsa:
    """One vector instruction set the direct kernel is rendered for, picked at run time."""

    name: str                        # in function names and SPARSE_CAFFE_DIRECT_ISA
    target: str                      # GCC's target attribute for the functions
    cpu_features: tuple[str, ...]    # __builtin_cpu_supports names that must all be present
    register_bits: int               # 256 (ymm) or 512 (zmm)
    max_vectors: int                 # accumulator registers per strip (one microkernel per count)
    # Nonzeros ahead whose input lines the strip kernel prefetches into L1 (0: none). A layer's
    # padded input is L2-sized, so without it most of a strip's loads wait on L2.
    prefetch_ahead: int = 0


@dataclass(frozen=True)
class ConvTemplateConfig:
    """What the C++ templates are rendered with. Templates see only this (and the series entry)."""

    # Phases of a convolution forward pass that the per-layer profile times, in report order;
    # weight2csr is the (rare) rebuild of the weights' CSR form after they change.
    # output is sparse_output's epilogue (bias, fused ReLU, the output's CSR).
    phases: tuple[str, ...] = ("im2col", "input2csr", "multiply", "output", "bias", "weight2csr")
    # Forward paths of the multiply, numbered from 1 in this order in caffe.proto's ForwardPath.
    forward_paths: tuple[str, ...] = ("dense", "spmdm", "sparse_sparse", "sparse_output", "direct",
                                      "onednn", "activation_sparse", "gemm_1x1")
    # Implementations of the sparse paths, numbered from 1 in caffe.proto's SparseBackend.
    sparse_backends: tuple[str, ...] = ("openmp", "mkl")
    # The direct path's vector microkernels, best first (a portable scalar kernel always exists):
    # one per ISA, element type and strip length 1..max_vectors registers.
    direct_isas: tuple[SimdIsa, ...] = (
        SimdIsa("avx512", "avx512f", ("avx512f",), 512, 16),
        # prefetch 8 ahead: res3/res2/conv3-5 shapes' kernels 5-13% faster, res5's 3-8% (AMD
        # Zen 3, per-round ratios of interleaved runs). AVX-512 is left without: on a Cascade
        # Lake Xeon the same prefetch gave res5 +9%, res4 +8%, res3 +1%, CaffeNet conv3 -5%,
        # inside that machine's per-round spread (alternating processes of the two builds).
        SimdIsa("avx2", "avx2,fma", ("avx2", "fma"), 256, 12, prefetch_ahead=8),
    )
    # The direct product runs over the input channels in blocks whose part of a strip takes at
    # most this many bytes (half of a 32 KiB L1), unless that leaves fewer than
    # direct_block_nonzeros nonzeros per output channel and block on average.
    direct_block_bytes: int = 16384
    direct_block_nonzeros: int = 8
    # Our OpenMP regions under background load (omp_team.hpp): a region is late when a thread
    # started, or the master waited at its closing barrier, more than team_late_us beyond its own
    # share; a late region forked within team_solo_ms of the last late one sends the regions of
    # the next team_solo_ms to one thread.
    team_late_us: int = 2000
    team_solo_ms: int = 200
    # Forward paths of the InnerProduct (fully connected) multiply, numbered from 1 in this order in
    # caffe.proto's InnerProductParameter.ForwardPath.
    fc_forward_paths: tuple[str, ...] = ("dense", "sparse")
    # activation_sparse's block of output channels kept in vector registers, in bytes: 256 is
    # 64 floats (8 ymm on AVX2, 4 zmm on AVX-512) or 32 doubles. Its microkernels are rendered
    # for each of direct_isas and 1..(block bytes / register bytes) registers.
    activation_sparse_block_bytes: int = 256
    # ... and the bytes of a panel's rows (block bytes x input channels) one block of input
    # channels spans: the rows a tile of positions reads before the next block's (L1-resident).
    activation_sparse_slice_bytes: int = 16384
    # The path that picks one of the concrete paths per layer (convolutions: every forward path and
    # back end; InnerProduct: every fc forward path), numbered after them in both enums. Not one
    # of forward_paths / fc_forward_paths, so code iterating those still sees concrete paths only.
    auto_path: str = "auto"
    # Paths auto never runs, and why (rendered into the C++ and reported by caffe.auto_choices()).
    auto_excluded: tuple[tuple[str, str], ...] = (
        ("sparse_output", "excluded from auto: its output CSR pays off only when the next layer "
                          "reads it, and auto does not coordinate producer and consumer; "
                          "sparse_sparse (the same multiply) is a candidate"),
    )
    # Paths whose kernel is the same on every back end: auto times them once (openmp).
    backend_independent: tuple[str, ...] = ("dense", "direct", "onednn", "activation_sparse",
                                            "gemm_1x1")
    # auto's policy (auto_path.hpp): the cost model prunes every sparse path (but direct on a
    # kernel larger than 1x1) when more than auto_dense_weights of the weights are nonzero, and
    # any candidate predicted slower than
    # auto_prune_ratio x dense; calibration times auto_rounds rounds after one warm-up round; a
    # sparse path must beat dense's median by more than auto_margin; the input's nonzero fraction
    # is averaged over the calibration forwards, then sampled every auto_density_check_every
    # forwards into a moving average (each sample weighing auto_density_smoothing, so that one
    # image's sparsity does not re-plan), and a re-plan follows when that average moves more than
    # auto_density_shift from the calibrated one.
    auto_dense_weights: float = 0.6
    auto_prune_ratio: float = 1.5
    auto_rounds: int = 5
    # ...and goes on, up to this many times auto_rounds, while the winner has not been faster
    # than every other candidate in three rounds of four (a noise burst, or a near tie).
    auto_max_rounds_factor: int = 3
    auto_margin: float = 0.05
    auto_density_shift: float = 0.15
    auto_density_check_every: int = 8
    auto_density_smoothing: float = 0.25

    def __post_init__(self) -> None:
        if not self.phases or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"phases must be unique and non-empty: {self.phases}")
        if not self.forward_paths or self.forward_paths[0] != "dense":
            raise ValueError("dense must be the first forward path (the baseline)")
        if not self.sparse_backends or self.sparse_backends[0] != "openmp":
            raise ValueError("openmp must be the first sparse back end (always built)")
        for isa in self.direct_isas:
            if (isa.register_bits not in (256, 512) or not 1 <= isa.max_vectors <= 24 or
                    not 0 <= isa.prefetch_ahead <= 64):
                raise ValueError(f"unsupported direct ISA {isa}")
        if any(self.activation_sparse_block_bytes % (isa.register_bits // 8) or
               self.activation_sparse_block_bytes > 2048 for isa in self.direct_isas):
            raise ValueError("activation_sparse_block_bytes must be a multiple of every ISA's "
                             f"register bytes, at most 2048: {self.activation_sparse_block_bytes}")
        if self.activation_sparse_slice_bytes < self.activation_sparse_block_bytes:
            raise ValueError("activation_sparse_slice_bytes must hold at least one block: "
                             f"{self.activation_sparse_slice_bytes}")
        if not self.fc_forward_paths or self.fc_forward_paths[0] != "dense":
            raise ValueError("dense must be the first InnerProduct forward path (the baseline)")
        if self.auto_max_rounds_factor < 1:
            raise ValueError("auto_max_rounds_factor must be at least 1")
        if self.auto_path in self.forward_paths + self.fc_forward_paths:
            raise ValueError(f"{self.auto_path} must not name a concrete forward path")
        unknown = [p for p, _ in self.auto_excluded if p not in self.forward_paths or p == "dense"] + \
            [p for p in self.backend_independent if p not in self.forward_paths]
        if unknown:
            raise ValueError(f"auto_excluded / backend_independent name unknown paths: {unknown}")

    @property
    def selectable_paths(self) -> tuple[str, ...]:
        """Every convolution path a user may ask for: the concrete ones, then auto."""
        return self.forward_paths + (self.auto_path,)

    @property
    def fc_selectable_paths(self) -> tuple[str, ...]:
        """Every InnerProduct path a user may ask for: the concrete ones, then auto."""
        return self.fc_forward_paths + (self.auto_path,)


@dataclass(frozen=True)
class PatchSpec:
    """One patch of the series: which rendered files it carries and why."""

    number: int
    slug: str
    description: str
    files: tuple[str, ...]  # paths inside the Caffe tree

    @property
    def filename(self) -> str:
        return f"{self.number:04d}-{self.slug}.patch"


# The ordered series. Each file path has a template: templates/<path>.j2 (a complete new file) or
# templates/<path>.edit.j2 (anchored edits of the upstream file; see templating.apply_edits).
PATCH_SERIES: tuple[PatchSpec, ...] = (
    PatchSpec(
        1, "protobuf-3.6-total-bytes-limit",
        "Build with protobuf >= 3.6 (Debian 12 has 3.21): CodedInputStream::SetTotalBytesLimit lost\n"
        "its second argument there; keep the two-argument call for older protobuf.",
        ("src/caffe/util/io.cpp",),
    ),
    PatchSpec(
        2, "blob-write-version",
        "Give SyncedMemory a version number, drawn from one process-wide counter on creation and\n"
        "on every write access (mutable_*_data, set_*_data), so caches derived from a blob know\n"
        "when the blob changed, and a freed blob's version is never seen again at its address.",
        ("include/caffe/syncedmem.hpp", "src/caffe/syncedmem.cpp"),
    ),
    PatchSpec(
        3, "conv-forward-paths-and-profile",
        "The convolution forward multiply goes through one dispatch point with five paths:\n"
        "dense (Caffe's GEMM), spmdm (CSR weights x dense lowered input), sparse_sparse (CSR\n"
        "weights x the lowered input's CSR, built from the feature map without im2col),\n"
        "sparse_output (the same, also keeping the output's CSR with the top blob for the next\n"
        "convolution), on our OpenMP kernels or MKL's sparse BLAS, with an optional fused ReLU,\n"
        "and direct (Park et al.'s direct sparse convolution: weights as offsets into a zero-padded\n"
        "copy of the input, a strip of outputs in vector registers, bias and ReLU fused; the input\n"
        "channels in L1-sized blocks, a strip's partial sums carried between them). The\n"
        "ForwardPath enum also names onednn, activation_sparse and gemm_1x1, which patches 5, 9\n"
        "and 10 implement (dense without them).\n"
        "Chosen per layer in the prototxt (convolution_param.forward_path, sparse_backend), from\n"
        "pycaffe, or process-wide with SPARSE_CAFFE_FORWARD_PATH / SPARSE_CAFFE_SPARSE_BACKEND.\n"
        "A per-layer profile times the phases and counts calls, input nonzeros, multiply-adds and\n"
        "CSR hand-overs; pycaffe reads it with caffe.conv_profile(). Caffe's convolution gtest\n"
        "gains a float/double check of direct's blocked product against the reference.",
        (
            "src/caffe/proto/caffe.proto",
            "include/caffe/util/conv_profile.hpp",
            "src/caffe/util/conv_profile.cpp",
            "include/caffe/util/omp_team.hpp",
            "src/caffe/util/omp_team.cpp",
            "include/caffe/util/activation_layout.hpp",
            "include/caffe/util/sparse_conv.hpp",
            "src/caffe/util/sparse_conv.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "src/caffe/layers/deconv_layer.cpp",
            "src/caffe/test/test_convolution_layer.cpp",
            "python/caffe/_caffe.cpp",
            "python/caffe/__init__.py",
        ),
),
    PatchSpec(
        4, "sparse-inner-product",
        "A sparse forward path for InnerProduct (fully connected) layers: the weights in CSR\n"
        "(16-bit column indices when the input has at most 65536 values), rebuilt when the weight\n"
        "blob is written, times the input, several images per pass over the weights, bias fused.\n"
        "Chosen per layer in the prototxt (inner_product_param.forward_path, or SkimCaffe's\n"
        "gemm_mode), from pycaffe, or process-wide with SPARSE_CAFFE_FC_PATH; profiled in the\n"
        "convolution profile under the layer's name. Backward stays dense.",
        (
            "src/caffe/proto/caffe.proto",
            "include/caffe/util/conv_profile.hpp",
            "include/caffe/util/sparse_inner_product.hpp",
            "src/caffe/util/sparse_inner_product.cpp",
            "include/caffe/layers/inner_product_layer.hpp",
            "src/caffe/layers/inner_product_layer.cpp",
            "python/caffe/_caffe.cpp",
            "python/caffe/__init__.py",
        ),
    ),
    PatchSpec(
        5, "onednn-convolution",
        "The onednn forward path: the convolution through oneDNN's CPU primitive (for the layers\n"
        "whose weights are dense, where only a better dense kernel helps), the whole batch in one\n"
        "call, weights reordered once into oneDNN's preferred layout and again when the weight\n"
        "blob's version changes, the primitive remade when the shape or batch changes, bias and\n"
        "fused ReLU inside it; float only. CMake links oneDNN when USE_ONEDNN is on; without it,\n"
        "or for double, N-D or non-finite operands, the layer runs dense (saying why once).",
        (
            "cmake/Dependencies.cmake",
            "include/caffe/util/onednn_conv.hpp",
            "src/caffe/util/onednn_conv.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "python/caffe/_caffe.cpp",
            "python/caffe/__init__.py",
        ),
    ),
    PatchSpec(
        6, "auto-forward-path",
        "A forward path `auto` for convolutions and InnerProduct layers: per layer, a cost model\n"
        "(weight and input nonzero fractions, kernel size) prunes hopeless candidates, the\n"
        "survivors (every concrete path and back end of the build but sparse_output) run the\n"
        "layer's first forwards in interleaved rounds, each computing the real output, and the\n"
        "fastest by median wins, dense unless a sparse path is more than 5% faster. Re-planned\n"
        "when the weights are written, the input shape changes, or the input's nonzero fraction\n"
        "moves by more than 0.15. pycaffe reports the choices with caffe.auto_choices().",
        (
            "src/caffe/proto/caffe.proto",
            "include/caffe/util/auto_path.hpp",
            "src/caffe/util/auto_path.cpp",
            "src/caffe/util/sparse_conv.cpp",
            "src/caffe/util/sparse_inner_product.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "include/caffe/layers/inner_product_layer.hpp",
            "src/caffe/layers/inner_product_layer.cpp",
            "python/caffe/_caffe.cpp",
            "python/caffe/__init__.py",
        ),
    ),
    PatchSpec(
        7, "caffe-time-loads-weights",
        "Caffe's command-line tool: `caffe time -weights a.caffemodel[,b.caffemodel]` copies the\n"
        "trained weights into the net before timing it (upstream, time ignores -weights and\n"
        "times the fillers' values), so a tuned pruned net is timed doing its real work.",
        ("tools/caffe.cpp",),
    ),
    PatchSpec(
        8, "fast-pooling-eltwise-relu",
        "The layers between the convolutions, which Amdahl leaves once those are fast: max and\n"
        "average pooling over the (image, channel) planes in parallel, max pooling without\n"
        "data-dependent branches and vectorised across output columns (AVX-512 or AVX2, picked\n"
        "at run time as direct's kernels are; bit-identical results, tested in Caffe's pooling\n"
        "gtest in float and double); Eltwise SUM in one parallel pass, with\n"
        "an optional fused ReLU (eltwise_param.fused_relu, SUM only, backward masked) that the\n"
        "deploy transform sets; ReLU in parallel on large blobs.",
        (
            "src/caffe/proto/caffe.proto",
            "src/caffe/layers/pooling_layer.cpp",
            "src/caffe/test/test_pooling_layer.cpp",
            "include/caffe/layers/eltwise_layer.hpp",
            "src/caffe/layers/eltwise_layer.cpp",
            "src/caffe/layers/relu_layer.cpp",
        ),
    ),
    PatchSpec(
        9, "activation-sparse-1x1",
        "The activation_sparse forward path, for 1x1 convolutions whose weights are dense but whose\n"
        "input (after a ReLU) is mostly zero: out[:, p] = W[:, nz(p)] x in[nz(p), p], skipping the\n"
        "zero inputs. The weights transposed once (again when the weight blob's version changes)\n"
        "into panels of output channels, per output position the list of its nonzero input\n"
        "channels, a block of output channels in vector registers (AVX-512, AVX2 + FMA or scalar,\n"
        "picked at run time as direct's kernels are), bias and fused ReLU inside, the whole batch\n"
        "in one call (a parallel gather, then a parallel multiply); any stride, float and double.\n"
        "Other kernels, padding, groups, N-D and Deconvolution run dense (saying why once);\n"
        "non-finite weights run dense. A candidate of auto on 1x1 layers, predicted from the\n"
        "input's nonzero fraction.",
        (
            "include/caffe/util/activation_sparse_conv.hpp",
            "src/caffe/util/activation_sparse_conv.cpp",
            "include/caffe/util/auto_path.hpp",
            "src/caffe/util/auto_path.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "python/caffe/_caffe.cpp",
        ),
    ),
    PatchSpec(
        10, "gemm-1x1",
        "The gemm_1x1 forward path, for dense 1x1 convolutions with stride 1 and no padding: per\n"
        "image and group one product out = W x in + bias on Caffe's NCHW blobs as they are (no\n"
        "im2col, no reorder into a blocked layout and back), 6 output channels x 2 vectors of\n"
        "positions in registers (AVX-512, AVX2 + FMA or scalar, picked at run time as direct's\n"
        "kernels are), the input read in L2-sized chunks, bias and fused ReLU inside, the whole\n"
        "batch in one OpenMP region; any groups, float and double. Every weight meets every\n"
        "input as in Caffe's GEMM, so NaN and infinities come out as dense's. Other shapes run\n"
        "dense (saying why once). A candidate of auto on 1x1 stride-1 layers. Caffe's convolution\n"
        "gtest gains a float/double check of it against the reference convolution. Host blobs are\n"
        "64-byte aligned in every build (MKL builds already were), so rows of whole cache lines\n"
        "start on one and are read in place.",
        (
            "include/caffe/syncedmem.hpp",
            "include/caffe/util/gemm_1x1_conv.hpp",
            "src/caffe/util/gemm_1x1_conv.cpp",
            "include/caffe/util/auto_path.hpp",
            "src/caffe/util/auto_path.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "src/caffe/test/test_convolution_layer.cpp",
            "python/caffe/_caffe.cpp",
        ),
    ),
    PatchSpec(
        11, "fused-residual",
        "convolution_param.fused_residual: ResNet's residual Eltwise SUM folded into the\n"
        "convolution that feeds it. The layer takes the residual as its last bottom (shaped as\n"
        "the top, never the top itself) and writes relu?(conv(x) + bias + residual), fused_relu\n"
        "then meaning the ReLU after the sum. gemm_1x1 adds the residual while its outputs are in\n"
        "registers, so the sum's separate pass over memory goes; the other paths add it in one\n"
        "parallel pass after their own. Backward: the residual's gradient is the top gradient,\n"
        "masked by the ReLU. The deploy transform sets it (sparse_caffe); Caffe's convolution\n"
        "gtest checks it against convolution + Eltwise + ReLU and its gradient, in float and\n"
        "double, on whichever path is forced.",
        (
            "src/caffe/proto/caffe.proto",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "src/caffe/test/test_convolution_layer.cpp",
        ),
    ),
    PatchSpec(
        12, "onednn-hand-over",
        "onednn hands its output to the next onednn layer in oneDNN's blocked layout: the\n"
        "reorder back to Caffe's NCHW is left pending with the top blob (a deferred host write of\n"
        "its SyncedMemory, done by the first cpu_data / mutable_cpu_data, so every other reader\n"
        "gets NCHW as before), and a onednn consumer whose primitive reads that very layout takes\n"
        "the producer's buffer as its input: no reorder out, none in. A fused_residual onednn\n"
        "layer whose residual was handed over the same way adds it in the blocked layout and\n"
        "hands its own output on, and a strided 1x1 layer takes every stride-th row and column\n"
        "of a handed-over input. Counted as handed-over inputs in the profile; single-top layers\n"
        "only (one output buffer per layer). A producer whose pending output a reader made into\n"
        "NCHW anyway writes NCHW itself for 8 forwards (while the paths in force stay, and no\n"
        "layer calibrates auto, whose candidates run among their neighbours' hand-overs). auto\n"
        "takes onednn over a non-dense winner it is within the margin of: its hand-over saves\n"
        "reorders in its neighbours' times, which its own median does not show.",
        (
            "include/caffe/syncedmem.hpp",
            "src/caffe/syncedmem.cpp",
            "include/caffe/util/onednn_conv.hpp",
            "src/caffe/util/onednn_conv.cpp",
            "include/caffe/util/auto_path.hpp",
            "src/caffe/util/auto_path.cpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "src/caffe/test/test_convolution_layer.cpp",
        ),
    ),
    PatchSpec(
        13, "direct-hand-over",
        "direct hands its output over in the layout its consumer reads: a onednn layer's (whose\n"
        "primitive reads a pixel's channels side by side: nChw16c, channels last) or the next\n"
        "direct layer's zero-padded input. The consumer asks its producer for its layout each\n"
        "forward, for the next one under the same paths (SyncedMemory::want_layout); a direct\n"
        "producer then writes its output so into a buffer of its own (for a onednn consumer each\n"
        "strip's outputs gathered in a tile and written pixel by pixel; for a direct one into the\n"
        "padded places, the padding's zeros kept), leaves the copy into NCHW pending with the top\n"
        "blob (as onednn's hand-over does), and the consumer takes the buffer as its input: no\n"
        "reorder, no padding copy (direct only checks it for NaN and infinity). A request is\n"
        "forgotten when a reader makes the pending write into NCHW, except while auto\n"
        "calibrates: then it stays, so the consumer's onednn candidate is timed as in the chain,\n"
        "and a candidate that makes direct's pending write has that time left out of its\n"
        "sample (in the chosen chain direct would write NCHW at no extra cost; a onednn\n"
        "producer's reorder is charged as before). Counted as handed-over\n"
        "inputs in the consumer's profile; one top and no fused residual only. Caffe's\n"
        "convolution gtest checks direct's output in a blocked and a channels-last layout, and\n"
        "its NCHW copy, in float and double.",
        (
            "include/caffe/syncedmem.hpp",
            "src/caffe/syncedmem.cpp",
            "include/caffe/util/laid_out_output.hpp",
            "src/caffe/util/onednn_conv.cpp",
            "include/caffe/util/auto_path.hpp",
            "include/caffe/layers/base_conv_layer.hpp",
            "src/caffe/layers/base_conv_layer.cpp",
            "src/caffe/layers/conv_layer.cpp",
            "src/caffe/test/test_convolution_layer.cpp",
        ),
    ),
    PatchSpec(
        14, "onednn-padded-hand-over",
        "onednn hands its output over in a direct consumer's padded input layout (ResNet's\n"
        "branch2a -> branch2b): the consumer's request (SyncedMemory::want_layout, as in patch 13)\n"
        "for a plain layout with zeros between rows and planes is met by the reorder out of the\n"
        "primitive's layout, which writes the padded places (a strided oneDNN memory over a buffer\n"
        "of the producer's, zero elsewhere) in place of Caffe's NCHW; the copy into NCHW stays\n"
        "pending with the top blob, and direct takes the buffer as its input: no padding copy.\n"
        "Reading the NCHW copy ends it as for the other hand-overs; one top and no residual left\n"
        "to the caller only.",
        (
            "src/caffe/util/onednn_conv.cpp",
        ),
    ),
)

CONV_TEMPLATE_CONFIG = ConvTemplateConfig()
CAFFE = CaffePin()


# The folder the user ran ./inv from (./inv exports it before changing to the project root):
# relative paths the user gives (--images pics, SPARSE_CAFFE_RESULTS=myres) mean paths from there.
CALLER_CWD_ENV = "SPARSE_CAFFE_CALLER_CWD"


def caller_cwd() -> Path:
    """The user's working directory: $SPARSE_CAFFE_CALLER_CWD, else this process's (invoke run
    directly from the project folder, or a child process that inherited the variable)."""
    return Path(os.environ.get(CALLER_CWD_ENV) or os.getcwd())


def user_path(text: str | os.PathLike) -> Path:
    """A path the user typed, absolute: `~` expanded, a relative one taken from caller_cwd()."""
    path = Path(text).expanduser()
    return Path(os.path.normpath(caller_cwd() / path)) if not path.is_absolute() else path


def results_dir() -> Path:
    """Where benchmark runs are written: results/ in the repo, or $SPARSE_CAFFE_RESULTS."""
    configured = os.environ.get("SPARSE_CAFFE_RESULTS")
    return user_path(configured).resolve() if configured else PROJECT_ROOT / "results"


def cache_dir() -> Path:
    """Where fetched sources, build trees and ccache live: outside the repo, shared by clones."""
    configured = os.environ.get("SPARSE_CAFFE_CACHE")
    if configured:
        return user_path(configured).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "sparse-caffe"


def writable_folder(folder: Path, what: str) -> Path:
    """Create `folder` if needed and check that files can be written in it; UserError naming it
    and `what` it is for (e.g. "the results folder (SPARSE_CAFFE_RESULTS)") otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder; remove it or choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {folder}: {exc.strerror or exc}; choose a path "
                        "you can write to") from None
    probe = folder / f".sparse-caffe-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write into {what} {folder}: {exc.strerror or exc}; choose a path "
                        "you can write to") from None
    return folder
