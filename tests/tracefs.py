"""`xbttrace://`: the local filesystem as an fsspec protocol that logs every open and read, and can
fail reads on demand (a flaky network mount). The stream reads through fsspec, so tests observe
and disturb its real I/O path, also in forked DataLoader workers (the log is an append-only file
named by $XBT_TEST_TRACE; failures are set per process, so use them with num_workers=0)."""

from __future__ import annotations

import os
from collections import Counter

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "xbttrace"


class TracedFS(LocalFileSystem):
    protocol = PROTOCOL
    # basename -> reads still to fail, once `fail_after` bytes of that handle were read
    failures: dict[str, int] = {}
    fail_after = 2048

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode and path.endswith(".tar"):
            _log("open", path, 0)
            return _TracedFile(f, path)
        return f


class _TracedFile:
    def __init__(self, f, path):
        self.f, self.path, self.done = f, path, 0

    def read(self, n=-1):
        name = os.path.basename(self.path)
        if self.done >= TracedFS.fail_after and TracedFS.failures.get(name, 0) > 0:
            TracedFS.failures[name] -= 1
            raise ConnectionResetError(f"injected read error in {name}")
        data = self.f.read(n)
        self.done += len(data)
        _log("read", self.path, len(data))
        return data

    def seek(self, pos, whence=0):
        _log("seek", self.path, pos)
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _log(event: str, path: str, n: int) -> None:
    log = os.environ.get("XBT_TEST_TRACE")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {event} {os.path.basename(path)} {n}\n".encode())
        finally:
            os.close(fd)


def install(log_path) -> None:
    fsspec.register_implementation(PROTOCOL, TracedFS, clobber=True)
    os.environ["XBT_TEST_TRACE"] = str(log_path)
    open(log_path, "w").close()


def url(path) -> str:
    return f"{PROTOCOL}://{path}"


def events(log_path, kind: str) -> list[tuple[int, str, int]]:
    """(pid, shard file, n) of every `kind` event ("open", "read", "seek") so far."""
    out = []
    for line in open(log_path).read().splitlines():
        pid, event, name, n = line.split()
        if event == kind:
            out.append((int(pid), name, int(n)))
    return out


def opens(log_path) -> Counter:
    return Counter(name for _, name, _ in events(log_path, "open"))


def clear(log_path) -> None:
    open(log_path, "w").close()
