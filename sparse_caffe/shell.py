"""Running external commands: echoed, logged to a file, timed, with one clear line when they fail."""
from __future__ import annotations

import shlex
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .errors import UserError
from .terminal import say


def die_with_parent() -> None:
    """In a child, before exec: have the kernel kill it when its parent dies (kill -9 of ./inv
    leaves no orphan computing on). Linux prctl(PR_SET_PDEATHSIG, SIGKILL); a no-op elsewhere."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_logged(cmd: Sequence[str], log: Path, *, cwd: Path | None = None,
               env: Mapping[str, str] | None = None, what: str | None = None) -> None:
    """Run cmd with its output appended to log; on failure raise UserError naming the log."""
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ {line}\n")
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
        start = time.monotonic()
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    say(f"      ... {time.monotonic() - start:.0f} s; {_last_progress(log)}")
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if returncode != 0:
        tail = _tail(log, 15)
        raise UserError(f"{what or cmd[0]} failed (exit {returncode}); full log: {log}\n{tail}")


HEARTBEAT_SECONDS = 20


def _last_progress(log: Path) -> str:
    """The last line of the log, shortened: make's "[ 42%] Building ..." lines say where a build is."""
    with open(log, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 4096))
        lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    return last if len(last) <= 100 else last[:97] + "..."


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + t for t in text[-lines:])


@contextmanager
def step(label: str, index: int, total: int) -> Iterator[None]:
    """Print which step runs and, when it ends, how long it took."""
    start = time.monotonic()
    say(f"[{index}/{total}] {label} ...")
    try:
        yield
    except BaseException:
        say(f"[{index}/{total}] {label}: failed after {time.monotonic() - start:.1f} s")
        raise
    say(f"[{index}/{total}] {label}: done in {time.monotonic() - start:.1f} s")
