"""Throwaway services for fault tests: a private RabbitMQ node, Redis and pgvector Postgres on
their own loopback ports and data folders, so stopping or restarting them disturbs nothing
else on the machine. Each is started and stopped by the test that owns it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: object, up: bool, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bool(check()) == up:  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become {'up' if up else 'down'} within {timeout}s")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ThrowawayRedis:
    """``persistent`` keeps keys across a restart (AOF, fsync always), as a Redis that holds
    locks in production should; without it a restart starts empty."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mlpipe-redis-")
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        durability = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                      else ["--appendonly", "no"])
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", *durability, "--daemonize", "yes",
                        "--dir", self.dir], check=True, capture_output=True)
        _wait("redis", lambda: self._ping(), True)

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown",
                        "save" if self.persistent else "nosave"], capture_output=True)
        _wait("redis", lambda: self._ping(), False)

    def _ping(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True)
        return out.stdout.strip() == "PONG"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayPostgres:
    """A second pgvector Postgres (same PyPI binaries) on its own port and data folder."""

    def __init__(self) -> None:
        self.port = free_port()
        self.data = tempfile.mkdtemp(prefix="mlpipe-pg-")
        self.env = {**os.environ, "MLPIPE_PGVECTOR_PORT": str(self.port),
                    "MLPIPE_PGVECTOR_DATA": self.data}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/mlpipe"

    def _script(self, cmd: str) -> None:
        subprocess.run(["bash", str(ROOT / "scripts" / "pgvector-server"), cmd], env=self.env,
                       check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of our own (node name, ports, data under a temp folder), so broker
    restarts (``stop_app``/``start_app``) and forced closes hit only this scenario."""

    def __init__(self) -> None:
        self.port = free_port()
        self.node = f"mlpipe-chaos-{self.port}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="mlpipe-rabbit-"))
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], check=True,
                       capture_output=True, timeout=timeout)

    def start(self) -> None:
        server = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        env = {"RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
               "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.dir / "log"),
               "RABBITMQ_PID_FILE": str(self.dir / "pid")}
        cmd = ["env", *(f"{k}={v}" for k, v in env.items()), server, "-detached"]
        if os.geteuid() == 0:  # the broker runs as its own user, like the machine's node
            subprocess.run(["chown", "-R", "rabbitmq", str(self.dir)], check=True)
            cmd = ["runuser", "-u", "rabbitmq", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd="/tmp", timeout=60)
        _wait("rabbitmq", lambda: _listening(self.port), True, timeout=90)
        self._ctl("await_startup")

    def restart_app(self, down_s: float = 1.0) -> None:
        self._ctl("stop_app")
        time.sleep(down_s)
        self._ctl("start_app")
        self._ctl("await_startup")

    def close_all_connections(self) -> None:
        self._ctl("close_all_connections", "mlpipe chaos: forced close")

    def cleanup(self) -> None:
        try:
            self._ctl("stop", timeout=60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
