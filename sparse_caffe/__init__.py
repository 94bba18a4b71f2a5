"""sparse_caffe: fetch a pinned Caffe, render our patch series from templates, build, test, measure.

Modules follow the pipeline's stages: source -> render (templating owns jinja2) -> build -> run.
"""
