"""One KernelWatch per log directory: a lock file naming the process whose watch writes there.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as log_dir:
...     lock = DirLock.acquire(log_dir, strict=True)
...     DirLock.acquire(log_dir, strict=False) is None  # a second watch: warned, no lock
...     lock.release()
True
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from kernelwatch.errors import KernelWatchError

logger = logging.getLogger("kernelwatch")

#: The file a watch holds in its log directory while it writes there (TensorBoard ignores it).
LOCK_FILE = "kernelwatch.lock"


class DirLock:
    """:data:`LOCK_FILE` in a log directory, naming the process whose watch writes there.

    Created atomically (``O_EXCL``), removed at close. A lock left by a process of this host
    that no longer runs (a crashed or killed run) is taken over. One held by a live process,
    or by another host (whose processes cannot be checked), is reported: a warning naming
    both processes, or with ``strict`` a :class:`KernelWatchError`; the watch then writes
    without the lock.
    """

    _held: set[str] = set()  # lock files held by this process's watches (real paths)
    _held_guard = threading.Lock()

    def __init__(self, path: str, token: str):
        self.path, self.token = path, token

    @classmethod
    def acquire(cls, log_dir: str, strict: bool) -> DirLock | None:
        """The lock, or None (after a warning) if another watch holds it. An ``OSError`` if it
        cannot be created: the directory cannot be written."""
        path = os.path.join(log_dir, LOCK_FILE)
        me = _this_process()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(2):
            try:
                fd = os.open(path, flags, 0o666)
            except FileExistsError:
                holder = _read_lock(path)
                if attempt == 0 and cls._stale(path, holder):
                    logger.info(
                        "kernelwatch: took over the lock in %r of %s, which no longer runs", log_dir, _who(holder)
                    )
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                cls._report(log_dir, path, holder, me, strict)
                return None
            try:
                data = json.dumps(me).encode()
                while data:
                    data = data[os.write(fd, data) :]
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
            with cls._held_guard:
                cls._held.add(os.path.realpath(path))
            return cls(path, me["token"])
        return None  # unreachable: the second attempt reports

    def release(self) -> None:
        """Remove the lock file, if it is still this watch's."""
        with self._held_guard:
            self._held.discard(os.path.realpath(self.path))
        holder = _read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except OSError as err:
                logger.debug("kernelwatch: could not remove %r: %s", self.path, err)

    @classmethod
    def _stale(cls, path: str, holder: dict[str, Any] | None) -> bool:
        """Whether ``holder``'s process is known to have ended (this host only)."""
        if holder is None or holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if pid == os.getpid():  # this process: stale unless one of its watches holds it
            with cls._held_guard:
                return os.path.realpath(path) not in cls._held
        if os.name == "nt":
            return False  # os.kill(pid, 0) would terminate it there
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # alive, another user's
        started = holder.get("started")
        return started is not None and _process_start(pid) not in (None, started)  # the pid was reused

    @staticmethod
    def _report(log_dir: str, path: str, holder: dict[str, Any] | None, me: dict[str, Any], strict: bool) -> None:
        same_process = holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]
        other = "another KernelWatch of this process" if same_process else f"the KernelWatch of {_who(holder)}"
        effect = (
            "would mix a second timeline into it" if strict else "writes there too, so TensorBoard shows both timelines"
        )
        advice = (
            "close the other watch first"
            if same_process
            else f"if that run has ended (e.g. it was killed on another machine), delete {path!r}"
        )
        message = (
            f"{other} already writes to {log_dir!r}; this one ({_who(me)}) {effect}, duplicate steps "
            f"included. Give each run its own log_dir, or {advice}."
        )
        if strict:
            raise KernelWatchError(message)
        logger.warning("kernelwatch: %s", message)


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:200],
        "token": uuid.uuid4().hex,
    }


def _who(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unknown process (its lock file is unreadable)"
    who = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("since"):
        who += f", since {holder['since']}"
    if holder.get("command"):
        who += f": {holder['command']}"
    return who


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (Linux: clock ticks since boot), to tell a reused pid; else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


__all__ = ["LOCK_FILE", "DirLock"]
