"""Real ``redis-server`` processes for the tests and benchmarks: standalone, unix socket, TLS, Cluster.

Each server listens on 127.0.0.1 only, on a free port chosen at start, in its own temporary
folder, with persistence off. Under pytest-xdist every worker starts its own servers. Nothing
here talks to any other address, and nothing is mocked. :class:`ReplyDropper` is a real TCP
proxy in front of a server that loses a reply on demand (after the server ran the command).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import redis
from redis.crc import key_slot

HOST = "127.0.0.1"
#: The user a cluster's replicas log in to their master as (see RedisCluster.cut_replication).
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replication-secret"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_available() -> bool:
    """Whether redis-server and redis-cli are installed (scripts/test installs them)."""
    return os.access(REDIS_SERVER, os.X_OK) and os.access(REDIS_CLI, os.X_OK)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A loopback port that is free now (with port + 10000 free too, for a cluster's bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not cluster or (port < 55535 and _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One redis-server process; :meth:`restart` brings it back on the same port and folder."""

    def __init__(
        self,
        folder: Path,
        *,
        cluster: bool = False,
        unix_socket: bool = False,
        tls: TlsFiles | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.folder = folder
        self.cluster = cluster
        self.tls = tls
        self.extra = list(extra)
        self.port = 0
        self.unix_path: str | None = str(folder / "redis.sock") if unix_socket else None
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses --

    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://``) URL of database 0."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{HOST}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A raw redis-py client of this server (for checks that bypass the library)."""
        kwargs.setdefault("socket_timeout", 10)
        if self.tls is not None:
            kwargs.setdefault("ssl", True)
            kwargs.setdefault("ssl_ca_certs", str(self.tls.ca))
        return redis.Redis(host=HOST, port=self.port, **kwargs)  # type: ignore[arg-type]

    def command(self, *args: object) -> Any:
        """Run one command on this server over a fresh connection; its raw reply."""
        with contextlib.closing(self.client()) as client:
            return execute(client, *args)

    # -- lifecycle --

    def _command(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--bind", HOST,
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.folder),
            "--dbfilename", "unused.rdb",
            "--logfile", str(self.folder / "redis.log"),
            "--enable-debug-command", "local",
            # A replica's first sync starts at once, not after a 5 s wait for other replicas.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        if self.unix_path is not None:
            args += ["--unixsocket", self.unix_path, "--unixsocketperm", "700"]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.folder / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
        return args + self.extra

    def start(self) -> RedisServer:
        """Start on a free port (or the same port again) and wait until it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if not self.port:
                self.port = free_port(cluster=self.cluster)
            self.process = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                ready = self._wait_ready(10.0)
            except BaseException:
                self.kill()  # never leave a server behind
                raise
            if ready:
                return self
            self.kill()
            self.port = 0  # taken meanwhile by someone else: try another
        log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start in {self.folder}:\n{log}")

    def _wait_ready(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                with contextlib.closing(self.client(socket_timeout=0.5)) as client:
                    if client.ping():
                        return True
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(5)
        self.process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it answers nothing, and its connections stay open."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process go on (SIGCONT)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) the server and start it again on the same port, empty."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()


class RedisCluster:
    """A Redis Cluster made with ``redis-cli --cluster create``: three masters, and replicas if asked.

    With replicas, every replica logs in to its master as :data:`REPLICATION_USER`, so that
    :meth:`cut_replication` can stop a master's replication at once and for good (its replica
    cannot log in again) while the master goes on serving clients: a replica as far behind as
    one can be, on demand, with no timing luck.
    """

    def __init__(self, folder: Path, masters: int = 3, *, replicas: int = 0) -> None:
        self.replicas = replicas
        count = masters * (1 + replicas)
        self.nodes = [RedisServer(folder / f"node{i}", cluster=True) for i in range(count)]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A raw redis-py cluster client."""
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, socket_timeout=10)

    def start(self) -> RedisCluster:
        """Start the nodes, join them and wait until the cluster is ok and every replica in step."""
        for node in self.nodes:
            node.start()
            if self.replicas:
                node.command(
                    "ACL", "SETUSER", REPLICATION_USER, "on", f">{REPLICATION_PASSWORD}", "~*", "+@all"
                )
                node.command("CONFIG", "SET", "masteruser", REPLICATION_USER)
                node.command("CONFIG", "SET", "masterauth", REPLICATION_PASSWORD)
        subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        if self.replicas:
            self._wait_replicas_known(len(self.nodes) * self.replicas // (1 + self.replicas))
            for line in self._view():
                if not line.master:
                    wait_replica_synced(self.node(line.port))
        return self

    def _wait_replicas_known(self, count: int, seconds: float = 30.0) -> None:
        """Wait until every node knows ``count`` replicas (replicas are assigned after the join)."""
        deadline = time.monotonic() + seconds
        while any(sum(not line.master for line in self._view(node)) < count for node in self.running()):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's replicas were not assigned")
            time.sleep(0.05)

    def wait_ok(self, seconds: float = 30.0) -> None:
        """Wait until every running node answers and reports ``cluster_state:ok``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if all("cluster_state:ok" in _text(n.command("CLUSTER", "INFO")) for n in self.running()):
                    return
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    # -- topology, as the nodes report it --

    def running(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def node(self, port: int) -> RedisServer:
        """The node listening on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def _view(self, observer: RedisServer | None = None) -> list[_NodeLine]:
        """What ``observer`` (or the first running node) says of every node: ``CLUSTER NODES``."""
        text = _text((observer or self.running()[0]).command("CLUSTER", "NODES"))
        return [_NodeLine.parse(line) for line in text.splitlines() if line.strip()]

    def role(self, node: RedisServer) -> str:
        """``"master"`` or ``"slave"``, as the node says of itself."""
        return _text(node.command("ROLE")[0])

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The replicas of ``master``."""
        view = self._view()
        master_id = next(line.node_id for line in view if line.port == master.port)
        return [self.node(line.port) for line in view if line.master_id == master_id]

    def master_of_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot``."""
        for line in self._view():
            if line.master and "fail" not in line.flags and any(a <= slot <= b for a, b in line.slots):
                return self.node(line.port)
        raise LookupError(f"no master serves slot {slot}")

    # -- replication and failover --

    def cut_replication(self, master: RedisServer) -> None:
        """Stop replicating ``master``: its replicas are disconnected and cannot log in again."""
        replicas = self.replicas_of(master)
        master.command("ACL", "SETUSER", REPLICATION_USER, "off")
        master.command("CLIENT", "KILL", "USER", REPLICATION_USER)
        deadline = time.monotonic() + 10
        for replica in replicas:
            while _info(replica).get("master_link_status") == "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {replica.port} still replicates")
                time.sleep(0.02)

    def take_over(self, replica: RedisServer, seconds: float = 30.0) -> None:
        """Promote ``replica`` at once (``CLUSTER FAILOVER TAKEOVER``: its master may be dead).

        Returns when every running node's slot table names it.
        """
        replica.command("CLUSTER", "FAILOVER", "TAKEOVER")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.role(replica) == "master" and all(_serves(n, replica) for n in self.running()):
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node {replica.port} did not take over")

    def rejoin(self, node: RedisServer, seconds: float = 30.0) -> None:
        """Start a killed node again (empty): it rejoins as a replica of its successor, and syncs."""
        node.start()
        deadline = time.monotonic() + seconds
        while self.role(node) != "slave":
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.port} did not rejoin as a replica")
            time.sleep(0.05)
        wait_replica_synced(node, seconds)


def wait_replica_synced(replica: RedisServer, seconds: float = 30.0) -> None:
    """Wait until ``replica`` is in step with its master and new writes reach it.

    Its master proves the second part: a write there, then ``WAIT``, until every replica of it
    confirms. (After a full sync, a replica's link is up some time before its master streams
    writes to it: at its first acknowledgement, up to a second later.)
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = _info(replica)
        if info.get("master_link_status") == "up":
            with contextlib.closing(redis.Redis(host=HOST, port=int(info["master_port"]))) as master:
                replicas = int(master.info("replication")["connected_slaves"])
                master.set(_own_key(master), "probe")
                if replicas and int(execute(master, "WAIT", replicas, 100)) >= replicas:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"replica {replica.port} did not catch up with its master")


def execute(client: redis.Redis, *args: object) -> Any:
    """``client.execute_command(*args)``: a command's raw reply."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


def _own_key(client: redis.Redis) -> str:
    """A key that the server of ``client`` serves itself (in a cluster: in one of its own slots)."""
    if not client.info("cluster").get("cluster_enabled"):
        return "iron-test:probe"
    lines = _text(execute(client, "CLUSTER", "NODES")).splitlines()
    first, last = _NodeLine.parse(next(line for line in lines if "myself" in line)).slots[0]
    keys = (f"iron-test:probe:{i}" for i in itertools.count())
    return next(key for key in keys if first <= key_slot(key.encode()) <= last)


class ReplicatedServer:
    """A standalone master and one replica of it (``REPLICAOF``); persistence off, like every server."""

    def __init__(self, folder: Path) -> None:
        self.master = RedisServer(folder / "master")
        self.replica = RedisServer(folder / "replica")

    @property
    def url(self) -> str:
        """The master's URL."""
        return self.master.url

    def start(self) -> ReplicatedServer:
        """Start both, and wait until the replica is in step."""
        self.master.start()
        self.replica.start()
        self.replica.command("REPLICAOF", HOST, self.master.port)
        wait_replica_synced(self.replica)
        return self

    def stop(self) -> None:
        """Stop both (a paused replica is resumed first)."""
        self.replica.resume()
        self.replica.stop()
        self.master.stop()


def _info(node: RedisServer) -> dict[str, Any]:
    """``INFO replication`` of ``node``, parsed."""
    with contextlib.closing(node.client()) as client:
        return dict(client.info("replication"))


def _serves(observer: RedisServer, node: RedisServer) -> bool:
    """Whether ``observer``'s slot table names ``node`` as the master of some slots."""
    return any(int(entry[2][1]) == node.port for entry in observer.command("CLUSTER", "SLOTS"))


class _NodeLine(NamedTuple):
    """One line of ``CLUSTER NODES``."""

    node_id: str
    port: int
    flags: str
    master_id: str  # "-" for a master
    slots: list[tuple[int, int]]

    @property
    def master(self) -> bool:
        return "master" in self.flags.split(",")

    @classmethod
    def parse(cls, line: str) -> _NodeLine:
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        slots = []
        for spec in fields[8:]:
            if not spec.startswith("["):  # [slot->-node]: a slot migrating
                first, _, last = spec.partition("-")
                slots.append((int(first), int(last or first)))
        return cls(fields[0], port, fields[2], fields[3], slots)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ReplyDropper:
    """A TCP proxy to a Redis server that can swallow the server's next reply and hang up.

    The server has run the command by then: a client that retried it would apply it twice.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.drop = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies:
                    with self._lock:
                        dropping = self.drop > 0
                        self.drop -= dropping
                    if dropping:
                        break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()


class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = folder / "ca.crt"
        self.cert = folder / "server.crt"
        self.key = folder / "server.key"

    def create(self) -> TlsFiles:
        """Write the files (elliptic-curve keys: fast to make)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ca_key = self.folder / "ca.key"
        csr = self.folder / "server.csr"
        ext = self.folder / "ext.cnf"
        # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) asks for.
        ext.write_text(
            "subjectAltName=IP:127.0.0.1\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for args in (
            ["req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(self.ca), "-days", "2",
             "-subj", "/CN=iron test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", *ec, "-keyout", str(self.key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(self.cert), "-days", "2", "-extfile", str(ext)],
        ):  # fmt: skip
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
        return self


def short_tmpdir(prefix: str) -> Path:
    """A fresh folder under /tmp (unix socket paths must stay under ~100 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def namespace() -> str:
    """A namespace no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def release_source(folder: Path, commit: str, name: str) -> Path:
    """The package's ``src`` folder as it was at ``commit`` (release ``name``), extracted from this
    repository's history into ``folder``: for tests that write a namespace with an older version.
    Skips the test when the commit is not in this checkout."""
    import pytest

    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", commit, "src"], check=True, capture_output=True, timeout=60
        ).stdout
        subprocess.run(
            ["tar", "-x", "-C", str(folder)], input=archive, check=True, capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{name} (commit {commit}) is not in this checkout's history: {exc}")
    return folder / "src"
