"""Code that runs inside pycaffe: in a child process that the host's executors start
(host/run.py, host/docker_route.py) or in the Docker image (measure, Python 3.6)."""
