"""`promptclip serve` as real processes: signals stop the whole tree, start-up faults exit non-zero, workers, replicas.

Each test starts real ``bentoml serve`` processes (a few seconds each on 2 cores), so they are few and share the
synthetic bundle of ``conftest.py``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from promptclip.server import free_port, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "proc-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCLIP_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **extra})
    return env


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Serve:
    """``python -m promptclip serve ...`` as a real process (its own session, so signals go to it alone)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "promptclip", "serve", "--port", str(self.port), *args],
                                     env=env or _env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(log.parent))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_ready(self.url, self.proc, timeout=timeout, poll_s=0.3, describe=self.log)

    def kill(self) -> None:
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def serving(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Serve]:
    server = Serve(args, log, env)
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_whole_tree_and_frees_the_port(sig, synthetic_bundle, tmp_path):
    with serving(["--bundle", str(synthetic_bundle.path), "--state-dir", str(tmp_path / "state"),
                  "--token", TOKEN], tmp_path / "serve.log") as server:
        server.wait_ready()
        tree = _descendants(server.proc.pid)
        assert tree, "bentoml serve runs below promptclip serve"
        t0 = time.monotonic()
        server.proc.send_signal(sig)
        rc = server.proc.wait(timeout=30)
        took = time.monotonic() - t0
        assert rc == 0, server.log()
        left = [p for p in tree if _alive(p)]
        assert not left, f"still running after {signal.Signals(sig).name}: {left}"
        assert took < 15, f"stopping took {took:.1f}s"
        deadline = time.monotonic() + 5
        while not _port_free(server.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _port_free(server.port), f"port {server.port} still bound after the stop"


def _serve_exits(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptclip", "serve", "--port", str(free_port()), *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))


def test_a_bad_state_file_stops_start_up_with_its_message(synthetic_bundle, tmp_path):
    """Corrupt, unreadable or lost state: `promptclip serve` exits non-zero at once with the message (no server
    that crash-loops and hangs); a lost state file is only replaced with --start-empty."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "classes.json").write_text("{oops")
    proc = _serve_exits(["--bundle", str(synthetic_bundle.path), "--state-dir", str(state)])
    assert proc.returncode != 0 and "is corrupt" in proc.stderr and "Move it away" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    (state / "classes.json").write_text(json.dumps(
        {"format": "promptclip.classes", "format_version": 1, "version": 4, "names": ["cat", "zebra"]}))
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        (state / "classes.json").chmod(0)
        proc = _serve_exits(["--bundle", str(synthetic_bundle.path), "--state-dir", str(state)])
        assert proc.returncode != 0 and "Cannot read class state file" in proc.stderr, proc.stderr
        (state / "classes.json").chmod(0o644)

    (state / "classes.created").write_text("2026-01-01T00:00:00Z\n")
    (state / "classes.json").unlink()
    proc = _serve_exits(["--bundle", str(synthetic_bundle.path), "--state-dir", str(state)])
    assert proc.returncode != 0 and "is missing" in proc.stderr and "--start-empty" in proc.stderr, proc.stderr
    assert not (state / "classes.json").exists(), "nothing is written when the start is refused"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_workers_start_n_processes_over_one_class_list(synthetic_bundle, tmp_path):
    """`--workers 2` runs two worker processes; whichever answers, the class list and its version are one."""
    with serving(["--bundle", str(synthetic_bundle.path), "--state-dir", str(tmp_path / "state"), "--token", TOKEN,
                  "--workers", "2"], tmp_path / "serve.log") as server:
        server.wait_ready()
        workers = [p for p in _descendants(server.proc.pid) if "_bentoml_impl.worker" in _cmdline(p)]
        assert len(workers) == 2, [(p, _cmdline(p)) for p in _descendants(server.proc.pid)]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            added = c.post("/add_classes", json={"names": ["zebra"]}, headers=AUTH)
            assert added.status_code == 200, added.text
            version = added.json()["version"]
            pids = set()
            for _ in range(12):
                listed = c.post("/classes").json()
                assert listed["version"] == version and "zebra" in listed["names"]
                got = c.post("/classify", files={"image": ("x.png", _png_bytes(), "image/png")}, data={"top_k": "7"})
                assert got.status_code == 200 and got.json()["classes_version"] == version, got.text
                pids.add(c.post("/healthz").json()["worker_pid"])
            metrics = c.get("/metrics")
            assert metrics.status_code == 200
            for name in ("promptclip_classes", "promptclip_image_batch_size_count", "promptclip_text_encode_seconds",
                         "bentoml_service_request_total"):
                assert name in metrics.text, name
        assert pids <= set(workers)


def test_two_replicas_over_one_state_dir(synthetic_bundle, tmp_path):
    """Two `promptclip serve` processes (ports A and B) over one state directory: a class added on A is served by
    B on B's next request (bound: one stat of the state file per request; measured here under 1 s)."""
    state = tmp_path / "state"
    args = ["--bundle", str(synthetic_bundle.path), "--state-dir", str(state), "--token", TOKEN]
    with serving(args, tmp_path / "a.log") as a, serving(args, tmp_path / "b.log") as b:
        a.wait_ready()
        b.wait_ready()
        with httpx.Client(timeout=30) as c:
            added = c.post(f"{a.url}/add_classes", json={"names": ["snow leopard"]}, headers=AUTH)
            assert added.status_code == 200, added.text
            t0 = time.monotonic()
            while True:
                got = c.post(f"{b.url}/classify", files={"image": ("x.png", _png_bytes(), "image/png")},
                             data={"top_k": "7"})
                assert got.status_code == 200, got.text
                if any(p["name"] == "snow leopard" for p in got.json()["predictions"]):
                    break
                assert time.monotonic() - t0 < 1.0, "replica B did not serve the class within 1 s"
            assert got.json()["classes_version"] == added.json()["version"]
            removed = c.post(f"{b.url}/remove_classes", json={"names": ["snow leopard"]}, headers=AUTH)
            assert removed.status_code == 200 and removed.json()["version"] == added.json()["version"] + 1
            assert "snow leopard" not in c.post(f"{a.url}/classes").json()["names"]


def test_a_pinned_digest_that_does_not_match_stops_serve(synthetic_bundle, tmp_path):
    proc = _serve_exits(["--bundle", str(synthetic_bundle.path), "--bundle-digest", "sha256:" + "0" * 64])
    assert proc.returncode != 0 and "was pinned" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
