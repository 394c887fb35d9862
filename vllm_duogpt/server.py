"""Start, query and stop a ``vllm serve`` process on 127.0.0.1 (demo, tests, benchmarks)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL`` in a child process, through our CLI wrapper (vllm_cli).

    Use as a context manager: the server is stopped (SIGINT, then SIGKILL) on exit, and its log
    is kept in ``log_path`` for error messages.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        extra_args: list[str] | None = None,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = str(model)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.log_path = Path(log_path or f"vllm-serve-{self.port}.log")
        self.env = {**CPU_DEFAULT_ENV, **os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 600.0) -> None:
        """Launch the server and wait until ``/health`` answers.

        Raises:
            RuntimeError: with the tail of the server log if it exits or times out.
        """
        cmd = [sys.executable, "-m", "vllm_duogpt.vllm_cli", "serve", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        logger.info("starting: %s (log: %s)", " ".join(cmd), self.log_path)
        log = open(self.log_path, "wb")  # noqa: SIM115  (closed with the process)
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def post(self, route: str, payload: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
        """POST JSON to the server and return the decoded answer."""
        request = urllib.request.Request(
            f"{self.base_url}{route}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def model_name(self) -> str:
        with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=30) as resp:
            return json.loads(resp.read())["data"][0]["id"]
