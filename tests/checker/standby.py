"""A streaming standby of a harness PgCluster, and a reference that follows a failover.

tests/harness.py has no standby; this adds one without changing it:

    sb = Standby(primary)            # pg_basebackup -R -X stream, own port and socket dir, started
    sb.wait_streaming(primary)
    primary.set_conf(["synchronous_standby_names = '*'"]); primary.reload()   # synchronous replication
    ...
    primary.crash(); sb.promote()    # failover

`ClusterRef` is what the clients and the fault thread hold: every attribute is the current
cluster's, so after `ref.target = standby` they reconnect to the promoted server.
"""

from __future__ import annotations

import time

from harness import PG_BINDIR, PG_OS_USER, PgCluster, _make_tmpdir, _register, free_port


class Standby(PgCluster):
    def __init__(self, primary: PgCluster, name: str = "standby1"):  # noqa: super-init-not-called
        self.port = free_port()
        self.preload = primary.preload
        self.dir = _make_tmpdir("pg_redis_pg_standby_", owner=PG_OS_USER)
        self.datadir = self.dir / "data"
        self.sockdir = self.dir
        self.logfile = self.dir / "postgresql.log"
        self.name = name
        _register(self)
        self._run([str(PG_BINDIR / "pg_basebackup"), "-h", str(primary.sockdir), "-p", str(primary.port),
                   "-U", "postgres", "-D", str(self.datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync"],
                  what="pg_basebackup")
        self.set_conf([
            "# --- standby (tests/checker/standby.py) ---",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.sockdir}'",
            "hot_standby = on",
        ])
        self.start()

    def wait_streaming(self, primary: PgCluster, timeout: float = 30.0) -> None:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            # (pg_basebackup -R wrote primary_conninfo into postgresql.auto.conf, which wins over
            # postgresql.conf: the walreceiver's application_name is its default, not ours)
            rows = primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
            if rows and rows[0][0] > 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"standby {self.name} is not streaming after {timeout}s")

    def promote(self) -> None:
        self._pg_ctl("promote", "-w", "-t", "60")

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery()")[0][0])


class ClusterRef:
    """Delegates to `target`, which a failover replaces."""

    def __init__(self, target: PgCluster):
        self.__dict__["target"] = target

    def __getattr__(self, name):
        return getattr(self.__dict__["target"], name)

    def __setattr__(self, name, value):
        if name == "target":
            self.__dict__["target"] = value
        else:
            setattr(self.__dict__["target"], name, value)

    def __repr__(self):
        return f"ClusterRef({self.__dict__['target']!r})"
