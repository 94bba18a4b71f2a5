"""The one measurement entry point on the host: `measure(spec, executor, folder)`.

`./inv bench`, `./inv bench --docker` and `./inv bench-layer` all get their raw result here: the
RunSpec is written into a run folder, an executor runs the one child main
(sparse_caffe.inside.child) on it, and the child's RawResult (or its error record, turned into one
UserError line) comes back. The executors are interchangeable because the run folder is the
contract (sparse_caffe.inside.protocol):

- LocalExecutor (here): a pycaffe subprocess of a native build;
- docker_route.ContainerExecutor: a container of the Docker route's image, the run folder
  mounted into it; the image's pycaffe builds the nets, weights and images as the native one
  does, so the host needs no build. It stages the user's files into the run folder first
  (`prepared`) and names them as the host knows them in the result (`on_host`).

The other children (tune, check-baseline's plain loop, the memory probe) end the same way and
are run through `run_child`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from ..inside import protocol
from ..patching.build import Build
from ..patching.config import PROJECT_ROOT
from ..shell import die_with_parent

CHILD = "inside.child"  # the one measurement child, as `python -m sparse_caffe.<CHILD>`


def thread_env(threads: int) -> dict:
    """One thread count for OpenMP, OpenBLAS and MKL, so every path gets the same cores."""
    value = str(threads)
    return {"OMP_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value, "MKL_NUM_THREADS": value}


def pycaffe(build: Build, module: str, args: list[str], threads: int,
            capture_stderr: bool = False, capture_stdout: bool = False,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sparse_caffe.<module> args` with the build's pycaffe and `threads` threads."""
    env = build.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
    env.update(thread_env(threads))
    env.update(extra_env or {})
    # subprocess.run kills the child if this process is interrupted (Ctrl-C, SIGTERM through
    # tasks.user_errors); die_with_parent covers a parent killed outright.
    return subprocess.run([sys.executable, "-m", f"sparse_caffe.{module}", *args], env=env,
                          stderr=subprocess.PIPE if capture_stderr else None,
                          stdout=subprocess.PIPE if capture_stdout else None, text=True,
                          preexec_fn=die_with_parent)


class LocalExecutor:
    """Runs a child in a pycaffe subprocess of `build` with `threads` threads. Its progress goes
    to the terminal unless `capture` (then the tail of its stderr is kept for a crash's line)."""

    def __init__(self, build: Build, threads: int, extra_env: dict | None = None,
                 capture: bool = False):
        self.build, self.threads, self.extra_env, self.capture = build, threads, extra_env, capture

    def prepared(self, spec: protocol.RunSpec, folder: Path) -> protocol.RunSpec:
        return spec  # the child reads the host's files where they are

    def on_host(self, raw: protocol.RawResult) -> protocol.RawResult:
        return raw

    def run(self, folder: Path, module: str = CHILD, args: tuple = ()) -> tuple[int, str]:
        """Run `python -m sparse_caffe.<module> folder args`; (exit status, stderr's tail)."""
        result = pycaffe(self.build, module, [str(folder), *args], self.threads,
                         capture_stderr=self.capture, extra_env=self.extra_env)
        return result.returncode, "\n".join((result.stderr or "").splitlines()[-8:])


def run_child(executor, folder: Path, spec: protocol.RunSpec, what: str, module: str = CHILD,
              args: tuple = (), expect_result: bool = True) -> dict | None:
    """Write `spec` into `folder`, run `module` on it with `executor`; the child's result (its
    raw.json as JSON), or one UserError line: the child's own error record, else `what` failed
    with its exit status and the tail of its output."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in (protocol.RAW_FILE, protocol.ERROR_FILE):
        (folder / leftover).unlink(missing_ok=True)
    spec.write(folder / protocol.SPEC_FILE)
    status, tail = executor.run(folder, module, tuple(args))
    message = protocol.read_error(folder)
    if message is not None:
        raise UserError(message)
    if status != 0:
        raise UserError(f"{what} failed (exit {status})" + (f":\n{tail}" if tail else
                                                             "; its output is above"))
    if not expect_result:
        return None
    raw = folder / protocol.RAW_FILE
    if not raw.is_file():
        raise UserError(f"{what} exited without writing {protocol.RAW_FILE}")
    return json.loads(raw.read_text())


def measure(spec: protocol.RunSpec, executor, folder: Path,
            what: str = "the benchmark process") -> protocol.RawResult:
    """The one measurement entry point: `spec` measured by `executor` in the run folder
    `folder`; its RawResult (validated), or one UserError line."""
    spec = executor.prepared(spec, folder)
    return executor.on_host(protocol.RawResult.from_json(run_child(executor, folder, spec, what)))


def layer_table(record: dict) -> str:
    """The bench-layer table: per candidate its median and min, the ratio to dense, the input
    preparation's share, the multiply, the share of the limit and the difference from dense."""
    from ..inside.measure import AGREEMENT_TOLERANCE
    limit, probe, results = record["limit"], record["probe"], record["results"]
    shape = {k: record[k] for k in ("batch", "channels", "size", "num_output", "kernel", "pad",
                                    "stride")}
    args = record["args"]
    lines = [f"layer {record['shape']} (synthetic weights and input): {shape}; "
             f"{record['weight_zeros_measured']:.1%} zero weights, "
             f"{record['input_zeros_measured']:.1%} zero inputs; {args['repeats']} measured "
             f"forwards after {args['warmup']} warm-up; direct kernel: {record['direct_isa']}",
             f"limit t_min {limit['t_min_ms']:.4f} ms = max({limit['useful_macs'] / 1e6:.2f} M "
             f"useful multiply-adds at {probe['macs_per_second'] / 1e9:.1f} G/s (measured GEMM "
             f"rate), {limit['bytes'] / 1e6:.2f} MB at {probe['bytes_per_second'] / 1e9:.1f} GB/s "
             "(measured copy bandwidth))"]
    def name(r):
        return f"{r['path']} ({r['input']})" if r.get("input") else r["path"]

    width = max(len(name(r)) for r in results) + 2
    lines.append(f"{'path':<{width}}{'backend':<9}{'median ms':>10}{'min ms':>9}{'vs dense':>10}"
                 f"{'input prep':>11}{'prep %':>8}{'multiply':>10}{'t_min/t':>9}"
                 f"{'max rel diff':>14}")
    for r in results:
        flag = "  <-- DIFFERS FROM DENSE" if r["max_rel_diff"] > AGREEMENT_TOLERANCE else ""
        prep = r["phase_ms"].get("input2csr", 0) + r["phase_ms"].get("im2col", 0)
        lines.append(f"{name(r):<{width}}{r['backend']:<9}{r['median_ms']:>10.3f}"
                     f"{min(r['forward_ms']):>9.3f}{r['speedup_vs_dense']:>9.2f}x{prep:>11.3f}"
                     f"{prep / r['median_ms']:>8.0%}{r['phase_ms'].get('multiply', 0):>10.3f}"
                     f"{r['limit_fraction']:>9.2f}{r['max_rel_diff']:>14.1e}{flag}")
    lines.append("input prep: im2col + input2csr (direct: the padded copy); t_min/t: share of the "
                 "limit reached; paths timed in interleaved rounds, each a settling forward, a "
                 "profiled one (the phases) and an unprofiled (timed) one; (handed over): the "
                 "input written into the layer's padded layout by its producer, an identity 1x1 convolution on direct (timed: "
                 "the layer alone)")
    return "\n".join(lines)
