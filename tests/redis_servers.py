"""Real ``redis-server`` processes for the tests and benchmarks: standalone, unix socket, TLS, Cluster.

Each server listens on 127.0.0.1 only, on a free port chosen at start, in its own temporary
folder, with persistence off. Under pytest-xdist every worker starts its own servers. Nothing
here talks to any other address, and nothing is mocked. :class:`ReplyDropper` is a real TCP
proxy in front of a server that loses a reply on demand (after the server ran the command).
"""

from __future__ import annotations

import contextlib
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

import redis

HOST = "127.0.0.1"
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

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) the server and start it again on the same port, empty."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()


class RedisCluster:
    """A Redis Cluster of three masters and no replicas, made with ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(folder / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A raw redis-py cluster client."""
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, socket_timeout=10)

    def start(self) -> RedisCluster:
        """Start the nodes, join them and wait until every node reports the cluster ok."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        return self

    def wait_ok(self, seconds: float = 30.0) -> None:
        """Wait until every node answers and reports ``cluster_state:ok``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                states = []
                for node in self.nodes:
                    with contextlib.closing(node.client(socket_timeout=0.5)) as client:
                        info = client.execute_command("CLUSTER", "INFO").decode()
                        states.append("cluster_state:ok" in info)
                if all(states):
                    return
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


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
