from __future__ import annotations

import shutil

import pytest

from sparse_caffe.patching import render, series, templating
from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG, PATCH_SERIES, PATCHES_DIR, PatchSpec
from sparse_caffe.errors import UserError
from sparse_caffe.patching.source import ensure_source

SERIES = (
    PatchSpec(1, "fix-io", "Fix io.", ("src/caffe/util/io.cpp",)),
    PatchSpec(2, "new-and-edit", "Add a file, edit another.",
              ("src/caffe/util/extra.cpp", "src/caffe/layers/conv.cpp")),
)


@pytest.fixture
def templates(tmp_path):
    t = tmp_path / "templates"
    (t / "src/caffe/util").mkdir(parents=True)
    (t / "src/caffe/layers").mkdir(parents=True)
    (t / "src/caffe/util/io.cpp.edit.j2").write_text("//@ replace:   return 1;\n  return 2;\n")
    (t / "src/caffe/util/extra.cpp.j2").write_text(
        "/*% for p in config.phases %*/\nint /*{ p }*/ = /*{ loop.index }*/;\n/*% endfor %*/\n")
    (t / "src/caffe/layers/conv.cpp.edit.j2").write_text("//@ after:   int a = 1;\n  a += 1;\n")
    return t


def do_render(upstream, out, templates, series=SERIES):
    return render.render_series(upstream, out, series=series, config=CONV_TEMPLATE_CONFIG,
                                templates_dir=templates)


def test_series_is_deterministic_and_written_only_on_change(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    assert do_render(upstream, out, templates) == [s.filename for s in SERIES] + ["series"]
    first = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert do_render(upstream, out, templates) == []
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in out.iterdir()} == first
    assert (out / "series").read_text() == "0001-fix-io.patch\n0002-new-and-edit.patch\n"


def test_patches_apply_and_give_the_rendered_files(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    do_render(upstream, out, templates)
    tree = tmp_path / "tree"
    shutil.copytree(upstream, tree)
    series.apply_series(tree, out)
    for spec in SERIES:
        for path in spec.files:
            expected = render.render_file(path, spec, upstream, CONV_TEMPLATE_CONFIG, templates)
            assert (tree / path).read_text() == expected
    extra = (tree / "src/caffe/util/extra.cpp").read_text()
    assert extra.startswith("// @generated from templates/src/caffe/util/extra.cpp.j2")
    assert "int im2col = 1;" in extra
    assert "  return 2;" in (tree / "src/caffe/util/io.cpp").read_text()


def test_patch_headers_say_what_and_where_from(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    do_render(upstream, out, templates)
    text = (out / "0002-new-and-edit.patch").read_text()
    assert text.startswith("Subject: [PATCH 0002] new-and-edit\n\nAdd a file, edit another.\n")
    assert "templates/src/caffe/util/extra.cpp.j2" in text
    assert "--- /dev/null\n+++ b/src/caffe/util/extra.cpp" in text


def test_check_catches_a_template_change_and_a_stale_patch(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    do_render(upstream, out, templates)
    kwargs = dict(series=SERIES, config=CONV_TEMPLATE_CONFIG, templates_dir=templates)
    render.check(upstream, out, **kwargs)
    (templates / "src/caffe/util/io.cpp.edit.j2").write_text("//@ replace:   return 1;\n  return 3;\n")
    with pytest.raises(UserError, match="out of date"):
        render.check(upstream, out, **kwargs)
    do_render(upstream, out, templates)
    (out / "0003-left-over.patch").write_text("x")
    with pytest.raises(UserError, match="stale in patches/: 0003-left-over.patch"):
        render.check(upstream, out, **kwargs)
    assert "0003-left-over.patch" in do_render(upstream, out, templates)
    assert not (out / "0003-left-over.patch").exists()


def test_series_hash_follows_content_and_order(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    do_render(upstream, out, templates)
    before = series.series_sha256(out)
    (out / "series").write_text("0002-new-and-edit.patch\n0001-fix-io.patch\n")
    assert series.series_sha256(out) != before


@pytest.mark.parametrize("problem", ["orphan", "both", "whole-upstream", "numbering"])
def test_series_integrity_errors(tmp_path, upstream, templates, problem):
    series = SERIES
    if problem == "orphan":
        (templates / "src/caffe/util/unused.cpp.j2").write_text("x\n")
        match = "templates no patch uses"
    elif problem == "both":
        (templates / "src/caffe/util/io.cpp.j2").write_text("x\n")
        match = "need exactly one"
    elif problem == "whole-upstream":
        (templates / "src/caffe/util/io.cpp.edit.j2").rename(templates / "src/caffe/util/io.cpp.j2")
        match = "would replace Caffe's own"
    else:
        series = (SERIES[1], SERIES[0])
        match = "patch numbers"
    with pytest.raises(UserError, match=match):
        do_render(upstream, tmp_path / "patches", templates, series)


def test_a_patch_that_does_not_apply_is_one_clear_error(tmp_path, upstream, templates):
    out = tmp_path / "patches"
    do_render(upstream, out, templates)
    (upstream / "src/caffe/util/io.cpp").write_text("changed upstream\n")
    with pytest.raises(UserError, match="0001-fix-io.patch does not apply"):
        series.apply_series(upstream, out)


def test_committed_series_matches_templates_on_the_pinned_caffe():
    """The real check (./inv render --check): needs the pinned source, fetched once into the cache."""
    render.check(ensure_source(debian_patches=False).path)


def test_committed_series_applies_to_both_source_variants(tmp_path):
    """Our series applies without fuzz to the bare commit and to Debian's patched tree alike."""
    for variant in (False, True):
        tree = tmp_path / f"tree-{variant}"
        shutil.copytree(ensure_source(debian_patches=variant).path, tree, symlinks=True)
        series.apply_series(tree, PATCHES_DIR)
        assert "ConvProfile" in (tree / "src/caffe/layers/base_conv_layer.cpp").read_text()


def test_every_series_file_is_a_real_template():
    for spec in PATCH_SERIES:
        for path in spec.files:
            assert render.template_for(path)[0].endswith(".j2")


def test_a_later_patch_layers_its_edits_on_an_earlier_patchs_file(tmp_path, upstream, templates):
    """A file two patches change: the later one's <path>.<slug>.edit.j2 edits the earlier result."""
    layered = PatchSpec(3, "more-io", "Edit io.cpp again.", ("src/caffe/util/io.cpp",))
    specs = SERIES + (layered,)
    with pytest.raises(UserError, match="io.cpp.more-io.edit.j2, which is missing"):
        do_render(upstream, tmp_path / "patches", templates, specs)
    (templates / "src/caffe/util/io.cpp.more-io.edit.j2").write_text(
        "//@ after:   return 2;\n  // patched twice\n")
    out = tmp_path / "patches"
    do_render(upstream, out, templates, specs)
    tree = tmp_path / "tree"
    shutil.copytree(upstream, tree)
    series.apply_series(tree, out)
    text = (tree / "src/caffe/util/io.cpp").read_text()
    assert "  return 2;\n  // patched twice\n" in text
    assert text.startswith("// @generated from templates/src/caffe/util/io.cpp.edit.j2 and "
                           "templates/src/caffe/util/io.cpp.more-io.edit.j2 by ./inv render;")
    assert "--- a/src/caffe/util/io.cpp" in (out / "0003-more-io.patch").read_text()


def test_auto_is_numbered_after_the_concrete_paths_and_never_one_of_them():
    """auto is selectable (the enums' last value) but not a concrete path: code that iterates
    forward_paths keeps seeing only paths that compute something themselves."""
    from sparse_caffe.patching.config import ConvTemplateConfig

    config = CONV_TEMPLATE_CONFIG
    assert config.auto_path not in config.forward_paths + config.fc_forward_paths
    assert config.selectable_paths == config.forward_paths + (config.auto_path,)
    assert config.fc_selectable_paths == config.fc_forward_paths + (config.auto_path,)
    with pytest.raises(ValueError, match="must not name a concrete forward path"):
        ConvTemplateConfig(auto_path="direct")
    with pytest.raises(ValueError, match="unknown paths"):
        ConvTemplateConfig(auto_excluded=(("dense", "never"),))
    with pytest.raises(ValueError, match="unknown paths"):
        ConvTemplateConfig(backend_independent=("fast",))


def test_direct_kernels_prefetch_what_config_says():
    """The rendered AVX2 strip kernels prefetch the lines of the nonzero prefetch_ahead places
    on (every line a strip of v registers spans), AVX-512's none, and the offsets carry that many
    padding entries; a prefetch distance out of range is refused."""
    from sparse_caffe.patching.config import ConvTemplateConfig, SimdIsa

    config = CONV_TEMPLATE_CONFIG
    ahead = {isa.name: isa.prefetch_ahead for isa in config.direct_isas}
    path = "src/caffe/util/sparse_conv.cpp"
    spec = next(spec for spec in PATCH_SERIES if path in spec.files)
    source = templating.render(f"{path}.j2", {"config": config, "patch": spec})
    assert f"const int kDirectPrefetchAhead = {max(ahead.values())};" in source
    for isa in config.direct_isas:
        for v in (1, isa.max_vectors):
            body = source.split(f"void strip_{isa.name}_float_{v}(")[1].split("\n}\n")[0]
            lines = body.count("_mm_prefetch(")
            spans = v * isa.register_bits // 8
            assert lines == (0 if not isa.prefetch_ahead else len(range(0, spans, 64)) + 1)
            assert (f"off[j + {isa.prefetch_ahead}]" in body) == bool(isa.prefetch_ahead)
    with pytest.raises(ValueError, match="unsupported direct ISA"):
        ConvTemplateConfig(direct_isas=(SimdIsa("avx2", "avx2,fma", ("avx2", "fma"), 256, 12,
                                                prefetch_ahead=65),))
