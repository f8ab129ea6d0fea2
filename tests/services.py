"""Throwaway services for fault tests: a private RabbitMQ node, Redis and pgvector Postgres on
their own loopback ports and data folders, so stopping, restarting or killing them disturbs
nothing else on the machine. Each is started and stopped by the test that owns it.

``kill()`` is a SIGKILL, as an OOM kill or a lost machine delivers it. The pid is always the
service's own (read from its own pid file or port and checked against the process's command
line), never one found by name: the machine's shared RabbitMQ, Redis and Postgres run the same
binaries.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The broker settings of deploy/ that rabbitmq.conf cannot carry; every test broker runs them.
ADVANCED_CONFIG = ROOT / "deploy" / "rabbitmq" / "advanced.config"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
#: Below the kernel's ephemeral range when there is room (the Linux default starts at 32768).
_LISTEN_RANGE = (20000, 32000) if _EPHEMERAL[0] > 32000 else (_EPHEMERAL[1] + 1, 65535)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port for a server this process is about to start, free now and never handed
    out before by this process.

    Not from the kernel's ephemeral range (what ``bind(0)`` returns): between this call and
    the server's bind, any outgoing connection on the machine (the suite's own clients, or
    the Erlang distribution links of a cluster booting in parallel) may take an ephemeral port
    as its source port, and the server then fails to start with ``eaddrinuse``.
    """
    low, high = _LISTEN_RANGE
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


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


def _cmdline(pid: int) -> str:
    """Command line and environment of ``pid`` (a RabbitMQ node's name is only in the latter,
    as ``RABBITMQ_NODENAME``)."""
    out = []
    for part in ("cmdline", "environ"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            out.append(Path(f"/proc/{pid}/{part}").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"))
    return " ".join(out)


def _alive(pid: int) -> bool:
    """Whether the pid still exists, zombies included: Postgres and RabbitMQ check their old
    pid with ``kill(pid, 0)``, which a zombie not yet reaped by init still passes."""
    return Path(f"/proc/{pid}").exists()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def sigkill_own(pid: int, must_contain: str, what: str, timeout: float = 30) -> None:
    """SIGKILL ``pid`` after checking that its command line names ``must_contain`` (our own
    port, node name or data folder), and wait until it is gone."""
    cmdline = _cmdline(pid)
    if must_contain not in cmdline:
        raise RuntimeError(f"refusing to kill pid {pid}: not {what} ({cmdline[:200]!r})")
    os.kill(pid, signal.SIGKILL)
    _wait(f"{what} (pid {pid})", lambda: _alive(pid), False, timeout)


class ThrowawayRedis:
    """``persistent`` keeps keys across a restart (AOF), as a Redis that holds locks in
    production should; without it a restart starts empty. ``appendfsync`` is the AOF policy:
    ``everysec`` is what production runs (a crash loses up to about a second of writes),
    ``always`` loses nothing but fsyncs every write."""

    def __init__(self, *, persistent: bool = False, appendfsync: str = "everysec") -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync {appendfsync!r}")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mlpipe-redis-")
        self.persistent = persistent
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        durability = (["--appendonly", "yes", "--appendfsync", self.appendfsync]
                      if self.persistent else ["--appendonly", "no"])
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

    def pid(self) -> int:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "info", "server"],
                             capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError(f"redis on port {self.port} did not tell its pid")

    def kill(self) -> None:
        """SIGKILL the server: no AOF flush, no goodbye. With ``appendfsync everysec`` the
        writes of (up to) the last second are gone when it comes back."""
        sigkill_own(self.pid(), f":{self.port}", f"the throwaway redis on port {self.port}")

    def cleanup(self) -> None:
        if self._ping():
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

    def postmaster_pid(self) -> int:
        return int((Path(self.data) / "postmaster.pid").read_text().splitlines()[0])

    def kill(self, *, orphans_s: float = 10.0) -> None:
        """SIGKILL the postmaster: no shutdown checkpoint, so the next start runs crash
        recovery from the WAL. Its backends notice the postmaster is gone and exit on their
        own; any still there after ``orphans_s`` are killed too (they hold the old shared
        memory, which would stop the restart), as the OOM killer of a container would."""
        pid = self.postmaster_pid()
        children = _children(pid)
        sigkill_own(pid, self.data, f"the throwaway postgres in {self.data}")
        deadline = time.monotonic() + orphans_s
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in children:  # children of the postmaster checked above: ours
            if _alive(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        _wait("orphaned postgres backends", lambda: any(_alive(c) for c in children), False)

    def crash_recovered(self) -> bool:
        """Whether the server log shows crash recovery (the last start found no clean
        shutdown)."""
        log = Path(self.data) / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "not properly shut down" in text or "automatic recovery in progress" in text

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
        # what deploy/ runs: a dead-letter hop a node crash left unconfirmed comes back in 15 s
        shutil.copy(ADVANCED_CONFIG, self.dir / "advanced.config")

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
               "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
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

    def beam_pid(self) -> int:
        return int((self.dir / "pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL this node's beam (an OOM kill of the broker): no ``stop_app``, no
        connection close frames; clients find out from their sockets. ``start()`` boots it
        again from its data folder (quorum queues recover from their WAL)."""
        sigkill_own(self.beam_pid(), f"RABBITMQ_NODENAME={self.node} ",
                    f"the beam of {self.node}")
        (self.dir / "pid").unlink(missing_ok=True)

    def cleanup(self) -> None:
        try:
            self._ctl("stop", timeout=60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
