"""Progress for the user's terminal: one line on stderr, flushed (stdout is for results).

Python-3.6-clean: the Docker image ships it with sparse_caffe.inside.measure.
"""
import sys


def say(message):
    print(message, file=sys.stderr, flush=True)
