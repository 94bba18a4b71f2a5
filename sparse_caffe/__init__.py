"""sparse_caffe: fetch a pinned Caffe, render our patch series from templates, build, test, measure.

The folders read as the pipeline, and imports point down it (tests/test_layers.py checks both):

- the foundation here: `errors` (UserError), `files` (hashes, locks, atomic writes), `shell`
  (logged commands, one-line progress), `machine` (what this CPU is);
- `patching/`: the data model (`config`), then source -> render (`templating` owns jinja2) ->
  build, and the cache they share;
- `models/`: the nets, their prototxts and weights, synthetic weights, images, the ONNX import,
  the net in PyTorch, the memory a net needs;
- `inside/`: what runs inside pycaffe, in a child process of the host or in the Docker image
  (`measure` and what it imports are Python-3.6-clean);
- `host/`: what the user's command runs on the host: bench, tune, report, the executors that
  start the child processes (`run`, `docker_route`), the command line (`cli`).
"""
