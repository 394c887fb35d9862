"""Leave a process that ran a vLLM engine in-process, without interpreter teardown.

vLLM's CPU engine sometimes aborts during interpreter teardown ("terminate called without an
active exception", SIGABRT) after all work is done, turning finished runs into failures. Skipping
teardown with ``os._exit`` alone is not enough: the engine-core process and its workers would
outlive us, holding our stdout and stderr open, so a caller reading them waits forever.
:func:`exit_process` stops every descendant first.
"""

from __future__ import annotations

import os
import sys

import psutil

_STOP_SECONDS = 10.0


def exit_process(code: int) -> None:
    """Flush output, stop all descendant processes (terminate, then kill), exit with ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(descendants, timeout=_STOP_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=_STOP_SECONDS)
    os._exit(code)
