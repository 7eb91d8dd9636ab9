"""Real kmserve processes for the load and fault benchmarks: a server or worker child on loopback, and its RSS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
MSG_EXITED = "kmserve {args} exited with code {code} before it was ready; see {log}"
MSG_NOT_READY = "kmserve {args} was not ready after {timeout:.0f} s; see {log}"
MSG_TIMED_OUT = "timed out after {timeout:.0f} s waiting for {what}"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kmserve_env(data_dir: Path, threads: int = 1, **settings: object) -> dict[str, str]:
    """This process's environment plus KMSERVE_DATA_DIR and KMSERVE_<NAME> per setting; torch limited to `threads`."""
    env = {**os.environ, "KMSERVE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.update({f"KMSERVE_{name.upper()}": str(value) for name, value in settings.items() if value is not None})
    return env


def spawn_kmserve(args: list[str], env: Mapping[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """`kmserve ARGS` as a child process; its output is appended to `log` (discarded without one)."""
    if log is None:
        return subprocess.Popen([sys.executable, "-m", "clients.cli", *args], env=dict(env),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "clients.cli", *args], env=dict(env), stdout=out,
                                stderr=subprocess.STDOUT)


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """kill -9 the process and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=STOP_TIMEOUT_S)


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM and wait (SIGKILL when it does not exit in time); the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            sigkill(process)
    return int(process.returncode)


@dataclass
class ServerProcess:
    """A kmserve server child: its process, base URL and data dir."""

    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def admin_headers(self) -> dict[str, str]:
        """Authorization with the admin key the server wrote on its first start."""
        return {"Authorization": f"Bearer {(self.data_dir / 'admin.key').read_text().strip()}"}


def start_server(data_dir: Path, env: Mapping[str, str], *, command: str = "serve", log: Path | None = None,
                 timeout: float = READY_TIMEOUT_S) -> ServerProcess:
    """`kmserve serve` (or `up`: server plus worker) on a free loopback port, returned once /readyz answers 200."""
    port = free_port()
    args = [command, "--host", "127.0.0.1", "--port", str(port)]
    process = spawn_kmserve(args, env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _ready(url):
        if process.poll() is not None:
            raise RuntimeError(MSG_EXITED.format(args=" ".join(args), code=process.returncode, log=log))
        if time.monotonic() > deadline:
            sigkill(process)
            raise RuntimeError(MSG_NOT_READY.format(args=" ".join(args), timeout=timeout, log=log))
        time.sleep(0.25)
    return ServerProcess(process, url, data_dir)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (Linux); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(MSG_TIMED_OUT.format(timeout=timeout, what=what))
        time.sleep(interval)
