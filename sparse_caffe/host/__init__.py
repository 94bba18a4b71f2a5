"""The host side: the commands' logic (bench, tune, report), the executors that start the child
processes inside pycaffe (run, docker_route), and the command line (cli)."""
