"""Redis MONITOR trace: every command Redis executes, with its time, written to a file, so that
a difference can be explained key by key (who wrote or deleted the key, and when). Reconnects
after Redis restarts. CLIENT KILL TYPE normal does not touch it (a monitor is not 'normal')."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class Tracer(threading.Thread):
    def __init__(self, port: int, path: Path, stop: threading.Event):
        super().__init__(name="monitor", daemon=True)
        self.port = port
        self.path = path
        self.stop_ev = stop
        self.lines = 0

    def run(self):
        with open(self.path, "ab", buffering=1 << 16) as out:
            while not self.stop_ev.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                except OSError:
                    time.sleep(0.1)
                    continue
                out.write(f"# monitor connected at {time.time():.6f}\n".encode())
                try:
                    s.settimeout(0.5)
                    s.sendall(b"MONITOR\r\n")
                    buf = b""
                    while not self.stop_ev.is_set():
                        try:
                            chunk = s.recv(1 << 16)
                        except socket.timeout:
                            continue
                        if not chunk:
                            break
                        buf += chunk
                        *done, buf = buf.split(b"\r\n")
                        for ln in done:
                            if ln.startswith(b"+") and ln != b"+OK":
                                out.write(ln[1:] + b"\n")
                                self.lines += 1
                except OSError:
                    pass
                finally:
                    s.close()
                out.write(f"# monitor disconnected at {time.time():.6f}\n".encode())
                out.flush()


def key_history(path: Path, key: str, wall_t0: float, limit: int = 25) -> list[str]:
    """The trace lines that mention `key` (as a quoted argument), times on the run clock."""
    needle = ('"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"').encode("utf-8", errors="replace")
    out = []
    try:
        with open(path, "rb") as f:
            for ln in f:
                if needle in ln or (b":" + needle[1:]) in ln:
                    text = ln.decode("utf-8", errors="replace").rstrip("\n")
                    ts, _, rest = text.partition(" ")
                    try:
                        t = f"{float(ts) - wall_t0:8.3f}s"
                    except ValueError:
                        t = ts
                    out.append(f"{t} {rest[:260]}")
    except FileNotFoundError:
        return []
    return out[-limit:]
