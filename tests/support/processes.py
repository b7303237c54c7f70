"""Stopping the service processes a test started."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable


def stop_all(procs: Iterable[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process still running, give each ``grace`` seconds to exit, then SIGKILL what is left
    (named on stderr) and reap it: a Popen left unreaped warns when it is garbage-collected, in whichever
    later test happens to be running then."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"{proc.args!r} (pid {proc.pid}) did not stop within {grace:g} s of SIGTERM: killed", file=sys.stderr)
            proc.kill()
            proc.wait()
