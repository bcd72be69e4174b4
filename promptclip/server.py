"""Starting a ``bentoml serve`` process on a deploy bundle: the argv and environment (``promptclip serve``) and a
managed process on loopback (the demo, the end-to-end tests, the inference benchmark).

Torch-free: ``promptclip serve`` runs on a serving host.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

#: what ``bentoml serve`` loads (bentofile.yaml names the same service)
SERVICE_IMPORT_PATH = "serving.service:PromptclipService"
#: the folder that holds the ``serving`` package: the server process runs there so it can import the service
SERVICE_ROOT = Path(__file__).resolve().parent.parent


def serve_env(bundle: str | os.PathLike, state_dir: str | os.PathLike | None,
              token: str | None = None) -> dict[str, str]:
    """Environment for a BentoML server process on ``bundle``."""
    env = dict(os.environ)
    env["PROMPTCLIP_BUNDLE"] = str(Path(bundle).resolve())
    if state_dir:
        env["PROMPTCLIP_STATE_DIR"] = str(Path(state_dir).resolve())
    if token:
        env["PROMPTCLIP_API_TOKEN"] = token
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    return env


def serve_command(port: int, host: str, workers: int | None = None) -> list[str]:
    """argv of ``bentoml serve`` for the promptclip service (run from :data:`SERVICE_ROOT`)."""
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT_PATH, "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--api-workers", str(workers)]
    return cmd


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real ``bentoml serve`` process on loopback, started and stopped by pid."""

    def __init__(self, bundle: Path, *, port: int | None = None, state_dir: Path | None = None,
                 token: str | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = serve_env(bundle, state_dir, token)
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(serve_command(self.port, "127.0.0.1"), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(SERVICE_ROOT), start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``/readyz`` answers 200; raise with the server log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; log: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f}s; log: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM the server's process group (bentoml starts workers), SIGKILL after 15 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
