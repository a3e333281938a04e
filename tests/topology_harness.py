"""Servers for tests/test_topologies.py, on top of harness.py (same registration: everything
started is stopped and its directory removed at cleanup() and at exit).

    certs = make_certs(tmpdir)                  # CA, server, client, and an unrelated CA (openssl)
    tls = TlsRedisServer(certs)                 # TLS only: port 0, tls-port; url is rediss://
    s = SentinelSet()                           # master + replica + 3 sentinels (quorum 2)
    c = RedisClusterSet(3)                      # 3 masters, no replicas, all slots assigned
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from pathlib import Path

import redis as redis_py
from redis.cluster import ClusterNode, RedisCluster

from harness import (IS_ROOT, PG_OS_USER, REDIS_SERVER, RedisServer, _make_tmpdir, _register, _rmtree,
                     _unregister, free_port, wait_for)

REDIS_CLI = os.environ.get("PG_REDIS_REDIS_CLI", "/usr/bin/redis-cli")


def _give_to_pg(path: Path, mode: int) -> None:
    """Files PostgreSQL must read: owned by its OS user (a key must be private to it)."""
    if IS_ROOT:
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


class Certs:
    """PEM files in `dir`: ca, server (SAN 127.0.0.1, localhost), client, other_ca (signs nothing)."""

    def __init__(self, dir: Path):
        self.dir = dir
        self.ca = dir / "ca.crt"
        self.server_crt, self.server_key = dir / "server.crt", dir / "server.key"
        self.client_crt, self.client_key = dir / "client.crt", dir / "client.key"
        self.other_ca = dir / "other_ca.crt"


def make_certs(dir: Path) -> Certs:
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    dir.chmod(0o755)
    c = Certs(dir)

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=dir, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name, cn in (("ca", "pg_redis test CA"), ("other_ca", "unrelated CA")):
        ssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN={cn}")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (dir / f"{name}.ext").write_text(ext)
        ssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    for f in (c.ca, c.other_ca, c.server_crt, c.client_crt):
        f.chmod(0o644)
    c.server_key.chmod(0o600)   # redis-server (this user) reads it
    _give_to_pg(c.client_key, 0o600)
    return c


class TlsRedisServer(RedisServer):
    """A redis-server that speaks TLS only (port 0, tls-port). Clients must show a certificate
    signed by the CA when auth_clients is 'yes'."""

    def __init__(self, certs: Certs, auth_clients: str = "yes", extra_args=(), **kw):
        self.certs = certs
        self.tls_port = free_port()
        args = ["--port", "0", "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(certs.server_crt), "--tls-key-file", str(certs.server_key),
                "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", auth_clients, *extra_args]
        super().__init__(extra_args=args, **kw)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def client(self, **kw) -> redis_py.Redis:
        opts = dict(host="127.0.0.1", port=self.tls_port, db=0, password=self.password, decode_responses=False,
                    socket_timeout=30, ssl=True, ssl_ca_certs=str(self.certs.ca),
                    ssl_certfile=str(self.certs.client_crt), ssl_keyfile=str(self.certs.client_key))
        opts.update(kw)
        return redis_py.Redis(**opts)


def _wait_replication(replica: RedisServer, timeout=20.0):
    def up():
        info = replica.client().info("replication")
        return info.get("master_link_status") == "up"
    wait_for(up, timeout, what=f"replica on {replica.port} in sync")


class SentinelServer:
    """`redis-server <conf> --sentinel` monitoring `name` at 127.0.0.1:master_port."""

    def __init__(self, master_port: int, name: str = "mymaster", quorum: int = 2):
        self.port = free_port()
        self.dir = _make_tmpdir("pg_redis_sentinel_")
        self.conf = self.dir / "sentinel.conf"
        self.logfile = self.dir / "sentinel.log"
        self.conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.dir}", f"logfile {self.logfile}",
            f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 10000",
            f"sentinel parallel-syncs {name} 1", ""]))
        self.proc = None
        _register(self)
        self.proc = subprocess.Popen([REDIS_SERVER, str(self.conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.client().ping(), 10, what=f"sentinel on {self.port}")

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def cleanup(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    self.proc.wait(5)
        finally:
            _rmtree(self.dir)
            _unregister(self)


class SentinelSet:
    """A master, one replica, and `n` sentinels that know both."""

    name = "mymaster"

    def __init__(self, n: int = 3, quorum: int = 2, replica_args=()):
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []
        try:
            self.master = RedisServer()
            self.servers.append(self.master)
            self.replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(self.master.port), *replica_args])
            self.servers.append(self.replica)
            _wait_replication(self.replica)
            for _ in range(n):
                self.sentinels.append(SentinelServer(self.master.port, self.name, quorum))

            def ready():
                for s in self.sentinels:
                    m = s.client().sentinel_master(self.name)
                    if int(m.get("num-slaves", 0)) < 1 or int(m.get("num-other-sentinels", 0)) < n - 1:
                        return False
                return True
            wait_for(ready, 30, 0.2, "sentinels to know the replica and each other")
        except BaseException:
            self.cleanup()
            raise

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """SENTINEL FAILOVER; returns the new master once every sentinel names it and it says so."""
        old = self.master_port()
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", self.name)

        def switched():
            ports = {int(s.client().sentinel_get_master_addr_by_name(self.name)[1]) for s in self.sentinels}
            if len(ports) != 1 or old in ports:
                return None
            new = self.server_on(ports.pop())
            return new if new.client().info("replication").get("role") == "master" else None
        return wait_for(switched, timeout, 0.1, "the failover")

    def cleanup(self) -> None:
        for s in self.sentinels:
            s.cleanup()
        for s in self.servers:
            s.cleanup()


class RedisClusterSet:
    """`n` cluster-enabled redis-servers joined by `redis-cli --cluster create` (no replicas)."""

    def __init__(self, n: int = 3):
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(n):
                # The bus port defaults to port + 10000, past 65535 for many free ports: pick one.
                self.nodes.append(RedisServer(extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "3000",
                                                          "--cluster-config-file", "nodes.conf",
                                                          "--cluster-port", str(free_port())]))
            self.cli("--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.nodes],
                     "--cluster-replicas", "0", "--cluster-yes")
            self.wait_ok()
        except BaseException:
            self.cleanup()
            raise

    def cli(self, *args, timeout=120) -> str:
        p = subprocess.run([REDIS_CLI, *args], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {p.stdout}\n{p.stderr}")
        return p.stdout

    def wait_ok(self, timeout=30.0):
        def ok():
            for s in self.nodes:
                info = s.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
            return True
        wait_for(ok, timeout, 0.1, "cluster_state:ok on every node")

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.nodes[:2])

    def node_id(self, s: RedisServer) -> str:
        return s.client().execute_command("CLUSTER", "MYID").decode()

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", s.port) for s in self.nodes],
                            decode_responses=True)

    def reshard(self, src: RedisServer, dst: RedisServer, slots: int) -> str:
        return self.cli("--cluster", "reshard", f"127.0.0.1:{src.port}", "--cluster-from", self.node_id(src),
                        "--cluster-to", self.node_id(dst), "--cluster-slots", str(slots), "--cluster-yes",
                        "--cluster-pipeline", "50", timeout=300)

    def cleanup(self) -> None:
        for s in self.nodes:
            s.cleanup()


class ClusterView:
    """What tests/test_mirror.py's redis_json/redis_hash need (scan_iter, mget, pipeline), over a
    whole cluster: SCAN on every master, reads routed by redis-py's cluster client."""

    def __init__(self, cluster: RedisClusterSet):
        self.cluster = cluster
        self.rc = cluster.client()

    def scan_iter(self, match=None, count=None):
        for s in self.cluster.nodes:
            c = s.client(decode_responses=True)
            try:
                yield from c.scan_iter(match=match, count=count)
            finally:
                c.close()

    def mget(self, keys):
        return [self.rc.get(k) for k in keys]

    def pipeline(self, transaction=False):
        return self.rc.pipeline()

    def close(self):
        self.rc.close()
