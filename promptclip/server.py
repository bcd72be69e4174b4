"""Starting a ``bentoml serve`` process on a deploy bundle: the argv and environment (``promptclip serve``) and a
managed process on loopback (the demo, the end-to-end tests, the inference benchmark).

Torch-free: ``promptclip serve`` runs on a serving host.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

#: seconds a stopped server gets to exit after SIGTERM before its process group is killed
STOP_GRACE_S = 10.0

#: what ``bentoml serve`` loads (bentofile.yaml names the same service)
SERVICE_IMPORT_PATH = "serving.service:PromptclipService"
#: the folder that holds the ``serving`` package: the server process runs there so it can import the service
SERVICE_ROOT = Path(__file__).resolve().parent.parent


def serve_env(bundle: str | os.PathLike, state_dir: str | os.PathLike | None,
              token: str | None = None, *, workers: int | None = None,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a BentoML server process on ``bundle`` (``workers``: ``PROMPTCLIP_WORKERS``, which the
    service's decorator reads; ``extra``: further ``PROMPTCLIP_*`` settings)."""
    env = dict(os.environ)
    env["PROMPTCLIP_BUNDLE"] = str(Path(bundle).resolve())
    if state_dir:
        env["PROMPTCLIP_STATE_DIR"] = str(Path(state_dir).resolve())
    if token:
        env["PROMPTCLIP_API_TOKEN"] = token
    if workers:
        env["PROMPTCLIP_WORKERS"] = str(int(workers))
    env.update(extra or {})
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    return env


def serve_command(port: int, host: str) -> list[str]:
    """argv of ``bentoml serve`` for the promptclip service (run from :data:`SERVICE_ROOT`). The number of worker
    processes is not a flag of ``bentoml serve`` 1.4: it travels in ``PROMPTCLIP_WORKERS`` (:func:`serve_env`)."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT_PATH, "--host", host, "--port", str(port)]


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def supervise(cmd: list[str], env: dict[str, str], cwd: str | os.PathLike, *,
              grace_s: float = STOP_GRACE_S) -> int:
    """Run ``cmd`` as the leader of its own process group and own that tree: SIGTERM, SIGINT and SIGHUP to this
    process are forwarded to the whole group as SIGTERM, anything still alive ``grace_s`` later is SIGKILLed, and
    nothing of the group outlives this function (so the port is free when it returns).

    Returns 0 when stopped by a signal and the server exited cleanly, else the server's exit status (a server
    that exits by itself, e.g. on a start-up error, passes its non-zero status through)."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), start_new_session=True)
    pgid = proc.pid
    stop_requested: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not stop_requested:
            logger.info("received %s: stopping the server (process group %d)", signal.Signals(signum).name, pgid)
        stop_requested.append(signum)
        _kill_group(pgid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        # the leader is gone (or we are unwinding): give the rest of the group the grace period, then kill it
        if proc.poll() is None or _group_alive(pgid):
            _kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while (proc.poll() is None or _group_alive(pgid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None or _group_alive(pgid):
            logger.warning("server did not stop within %.0f s of SIGTERM: killing process group %d", grace_s, pgid)
            _kill_group(pgid, signal.SIGKILL)
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_requested:
        return 0 if rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else rc
    return rc


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, *, timeout: float = 120.0, poll_s: float = 0.2,
               describe: Callable[[], str] = lambda: "") -> None:
    """Block until ``url``/readyz answers 200 while ``proc`` (the server) runs.

    Raises:
        RuntimeError: the server exited first (with ``describe()``, e.g. its log's tail).
        TimeoutError: not ready after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; {describe()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"server not ready after {timeout:.0f}s; {describe()}")


class ServerProcess:
    """A real ``bentoml serve`` process on loopback, started and stopped by pid. For the demo, the tests and the
    benchmarks: without a ``token`` its class changes are open (``open_writes`` defaults to ``token is None``);
    ``promptclip serve`` never opens them unless asked."""

    def __init__(self, bundle: Path, *, port: int | None = None, state_dir: Path | None = None,
                 token: str | None = None, log_path: Path | None = None, workers: int | None = None,
                 extra_env: dict[str, str] | None = None, open_writes: bool | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        extra = dict(extra_env or {})
        if open_writes if open_writes is not None else token is None:
            # a loopback process for the demo, tests and benchmarks: writes open unless a token is given
            extra.setdefault("PROMPTCLIP_OPEN_WRITES", "1")
        env = serve_env(bundle, state_dir, token, workers=workers, extra=extra)
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(serve_command(self.port, "127.0.0.1"), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(SERVICE_ROOT), start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``/readyz`` answers 200; raise with the server log's tail if it exits or times out."""
        wait_ready(self.url, self.proc, timeout=timeout, describe=self.tail)

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
