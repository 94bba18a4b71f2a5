"""Run stage: run things against a finished build (Caffe's own gtests; pycaffe in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .build import Build


@dataclass(frozen=True)
class GtestCase:
    suite: str
    name: str
    passed: bool
    seconds: float
    message: str


def run_gtests(build: Build, gtest_filter: str = "-*GPU*", threads: int = 1,
               timeout: float = 900) -> tuple[list[GtestCase], str]:
    """Run Caffe's test binary from the source root (its tests read files relative to it).

    Returns every case from gtest's XML report, and the console output for diagnosis.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gtest.xml"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "GLOG_minloglevel": "2"}
        result = subprocess.run(
            [str(build.gtest_binary), f"--gtest_filter={gtest_filter}", f"--gtest_output=xml:{report}"],
            cwd=build.source, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        if not report.is_file():
            raise RuntimeError(f"gtest wrote no report (exit {result.returncode}):\n{output[-3000:]}")
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            failures = [f.get("message", "") for f in case.findall("failure")]
            cases.append(GtestCase(suite=case.get("classname", ""), name=case.get("name", ""),
                                   passed=not failures and case.get("status", "run") == "run",
                                   seconds=float(case.get("time", "0") or 0),
                                   message="\n".join(failures)))
    return cases, output
