"""What the fixtures that start a server process share: waiting until it says it is ready (or
failing with its log's tail), stopping it, and running a build script that prints a folder."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def http_ok(url: str) -> bool:
    """GET `url` answers 200 (a readiness endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_ready(name: str, process: subprocess.Popen, log: Path, ready: Callable[[], bool], timeout: float,
               error: type[Exception]) -> None:
    """Poll `ready` until it holds; a process that exits, or one not ready in time (it is stopped),
    raises `error` naming it, with its log's last lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{name} exited with code {process.returncode}; last lines of {log}:\n{log_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    stop(process)
    raise error(f"{name} was not ready within {timeout}s; last lines of {log}:\n{log_tail(log)}")


def stop(process: Optional[subprocess.Popen], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def build_folder(script: Path, names: tuple[str, ...], error: type[Exception]) -> Path:
    """Run a build script that prints, on its last line, the folder holding `names`."""
    shown = script.relative_to(script.parents[2])
    try:
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        raise error(f"{shown} ran over an hour") from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise error(f"{shown} failed (exit {result.returncode}):\n{tail}")
    folder = Path(result.stdout.strip().splitlines()[-1])
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise error(f"{shown} left no {', '.join(missing)} in {folder}")
    return folder
