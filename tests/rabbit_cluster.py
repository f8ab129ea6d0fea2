"""A private 3-node RabbitMQ cluster on loopback, for tests that lose a node.

Production runs RabbitMQ as a 3-node cluster with quorum queues (``deploy/``); a machine that
vanishes there is a node whose beam process dies without a word. This module gives tests and
the chaos harness that topology on one machine, leaving the machine's own broker
(``rabbit@localhost``, port 5672) alone: three nodes of our own, each with its own node name,
AMQP port, distribution port, data and log folders, joined into one cluster.

Usage (blocking calls: from async code wrap them in ``asyncio.to_thread``)::

    from tests.rabbit_cluster import RabbitCluster

    cluster = RabbitCluster()            # picks free ports, nothing started yet
    cluster.start()                      # boots the three at once; 2 and 3 join 1 as they boot
    try:
        cluster.add_vhost("chaos")       # vhosts and permissions are cluster-wide
        settings = Settings(broker_url=cluster.url_for("chaos"))   # all three hosts
        ...                              # declare: quorum queues get a member on every node
        node = cluster.leader_of("ml.summarize", "chaos")  # "mlpipe-cl-<tag>-2@localhost"
        cluster.kill(node)               # SIGKILL of that node's beam.smp, like an OOM kill
        cluster.wait_leader_elected("ml.summarize", "chaos", not_on=node)
        cluster.start(node)              # boots it again; it rejoins from its data folder
        cluster.wait_healthy()           # three running nodes, seen by every one of them
    finally:
        cluster.cleanup()                # kills whatever runs, removes the folders

``nodes`` lists the node names in start order (``nodes[0]`` is the seed the others joined);
``url`` (default vhost ``/``) and ``url_for(vhost)`` give the multi-host
``MLPIPE_BROKER_URL`` (``amqp://guest:guest@127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/vhost``);
``port_of(node)`` and ``node_at(port)`` map between nodes and AMQP ports (a client's
``amqp.connected`` log line names the ``host:port`` it chose); ``members_of(queue, vhost)``
and ``online_members_of`` show a quorum queue's replicas.

Quorum queues declared after ``start()`` have a member on each of the three nodes: mlpipe sets
no ``x-quorum-initial-group-size``, and the broker's default is every cluster member (check
with ``members_of``). A new queue's leader is on the node its declaring client is connected
to (``client-local``), so the first mlpipe process to connect usually leads every queue.

For subprocess daemons and producers pass ``MLPIPE_BROKER_URL=cluster.url``; each picks a
random node and fails over to the next when it dies (``mlpipe.broker.connection``). Each
node's logs are under ``cluster.root / "n<i>" / "log"``. Run as root, the nodes run as the
``rabbitmq`` user with the machine's Erlang cookie and epmd, as ``tests/services.py``'s
``PrivateRabbit`` does; ``kill`` and ``cleanup`` only ever signal a beam process whose
environment names one of this cluster's nodes.

Costs, measured on a loaded 2-core machine: ``start()`` 15-20 s (three boots at once: the
second and third find the first through classic-config peer discovery and join it at their
first boot, so no stop/reset/join/start round follows), ``start(node)`` 7-12 s, ``kill`` well
under a second; each ``rabbitmqctl`` query (``leader_of``, ``members_of``) costs about one
second of CLI start-up, so poll them at half-second intervals or slower. The Erlang VMs run
at most two schedulers each, none busy-waiting, so that three nodes and the tests share two
cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.services import ADVANCED_CONFIG, free_port

T = TypeVar("T")

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
#: At most two schedulers each, none busy-waiting: three brokers on two shared cores.
ERL_ARGS = "+S 2:2 +sbwt none +sbwtdcpu none +sbwtdio none"


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for in time."""


@dataclass
class _Node:
    name: str
    amqp_port: int
    dist_port: int
    dir: Path

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    def env(self) -> dict[str, str]:
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
        }


class RabbitCluster:
    """Three (``size``) private RabbitMQ nodes on loopback, clustered.

    :param size: number of nodes; three is the smallest cluster that survives losing one.
    :param timeout_s: bound of each blocking step (a boot, a join, a wait).
    """

    def __init__(self, size: int = 3, *, timeout_s: float = 120.0) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.timeout_s = timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="mlpipe-cluster-"))
        self.root.chmod(0o755)  # the nodes and rabbitmqctl run as the rabbitmq user
        tag = self.root.name.rsplit("-", 1)[-1].lower()
        self._nodes: list[_Node] = []
        seed = f"mlpipe-cl-{tag}-1@localhost"
        for i in range(1, size + 1):
            amqp, dist = free_port(), free_port()
            node = _Node(f"mlpipe-cl-{tag}-{i}@localhost", amqp, dist, self.root / f"n{i}")
            node.dir.mkdir()
            conf = (
                f"listeners.tcp.local = 127.0.0.1:{amqp}\n"
                "loopback_users = none\n"
                # what the Cluster Operator of deploy/ runs: a node cut off from the
                # majority pauses instead of serving stale state
                "cluster_partition_handling = pause_minority\n"
            )
            if i > 1:
                # The others join the first at their first boot (peer discovery), waiting
                # for it as long as a boot may take: all boot at once, and no node needs
                # the stop/reset/join/start round of rabbitmqctl calls afterwards.
                conf += (
                    "cluster_formation.peer_discovery_backend = classic_config\n"
                    f"cluster_formation.classic_config.nodes.1 = {seed}\n"
                    "cluster_formation.discovery_retry_interval = 500\n"
                    f"cluster_formation.discovery_retry_limit = {int(timeout_s * 2)}\n"
                )
            (node.dir / "rabbitmq.conf").write_text(conf)
            (node.dir / "enabled_plugins").write_text("[].\n")
            shutil.copy(ADVANCED_CONFIG, node.dir / "advanced.config")  # as deploy/ runs
            self._nodes.append(node)
        self._by_name = {n.name: n for n in self._nodes}

    # --- addresses ------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self._nodes]

    @property
    def url(self) -> str:
        return self.url_for("/")

    def url_for(self, vhost: str) -> str:
        """The multi-host broker URL of ``vhost`` (``"/"`` is the default vhost)."""
        hosts = ",".join(f"127.0.0.1:{n.amqp_port}" for n in self._nodes)
        path = "" if vhost == "/" else vhost.replace("/", "%2F")
        return f"amqp://guest:guest@{hosts}/{path}"

    def port_of(self, node: str) -> int:
        return self._node(node).amqp_port

    def node_at(self, port: int) -> str:
        for n in self._nodes:
            if n.amqp_port == port:
                return n.name
        raise KeyError(port)

    def _node(self, node: str) -> _Node:
        try:
            return self._by_name[node]
        except KeyError:
            raise KeyError(f"{node!r} is not a node of this cluster: {self.nodes}") from None

    # --- life cycle -------------------------------------------------------------------------

    def start(self, node: str | None = None) -> None:
        """Without ``node``: boot every node in parallel; the others join the first as they
        boot. With ``node``: boot that (killed or stopped) node again; it rejoins the cluster
        from its own data folder. Returns once the cluster is whole again."""
        if node is not None:
            if self.is_running(node):
                raise ClusterError(f"{node} is already running")
            self._boot(self._node(node))
        else:
            _parallel([functools.partial(self._first_boot, n) for n in self._nodes])
        self.wait_healthy()

    def _first_boot(self, node: _Node) -> None:
        """A node's first boot, tried twice: a boot that fails (a port taken between choosing
        and binding it, a join that lost a race with its sibling) says nothing about what the
        tests prove, which starts once the cluster is whole. The first failure, with the
        node's log, goes to stderr so that it is never hidden."""
        try:
            self._boot(node)
        except ClusterError as exc:
            print(f"RabbitCluster: first boot of {node.name} failed, booting it again: {exc}",
                  file=sys.stderr)
            for pid in _beam_pids({node.name}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _until(lambda: not any(_alive(p) for p in _beam_pids({node.name})),
                   self.timeout_s, f"{node.name}'s failed boot to end")
            shutil.rmtree(node.dir / "mnesia", ignore_errors=True)
            self._boot(node)

    def _boot(self, node: _Node) -> None:
        cmd = ["env", *(f"{k}={v}" for k, v in node.env().items()), SERVER, "-detached"]
        if os.geteuid() == 0:  # the broker runs as its own user, like the machine's node
            subprocess.run(["chown", "-R", "rabbitmq", str(node.dir)], check=True)
            cmd = ["runuser", "-u", "rabbitmq", "--", *cmd]
        node.pid_file.unlink(missing_ok=True)
        subprocess.run(cmd, check=True, capture_output=True, cwd="/tmp", timeout=60)
        # ``wait`` waits for the pid file, then for the node's app: ``await_startup`` would
        # fail at once on a node that does not answer yet
        try:
            self._ctl(node, "wait", str(node.pid_file), "--timeout", str(int(self.timeout_s)))
        except ClusterError as exc:
            tail = _log_tail(node)
            raise ClusterError(f"{exc}\n--- {node.name}'s log ends with:\n{tail}") from None

    def kill(self, node: str) -> int:
        """SIGKILL the beam process of ``node`` (no shutdown, no goodbye to its peers) and
        return its OS pid once the process is gone."""
        pid = self.os_pid(node)
        os.kill(pid, signal.SIGKILL)
        _until(lambda: not _alive(pid), self.timeout_s, f"{node} (pid {pid}) to die")
        return pid

    def os_pid(self, node: str) -> int:
        """The OS pid of ``node``'s beam.smp, from the node's own pid file, checked against
        the process (a beam whose environment names this node) so that nothing but this node
        can ever be signalled, least of all the machine's own broker."""
        n = self._node(node)
        try:
            pid = int(n.pid_file.read_text().strip())
            exe = os.readlink(f"/proc/{pid}/exe")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            raise ClusterError(f"{node} is not running") from None
        if "beam" not in exe or f"RABBITMQ_NODENAME={n.name}".encode() not in environ:
            raise ClusterError(f"pid {pid} is not the beam process of {node} ({exe})")
        if not _alive(pid):
            raise ClusterError(f"{node} is not running (pid {pid} is a zombie)")
        return pid

    def is_running(self, node: str) -> bool:
        try:
            self.os_pid(node)
        except ClusterError:
            return False
        return True

    def cleanup(self) -> None:
        """Kill every node of this cluster still running (found by the node names in the
        beam processes' environment, so a node that died before writing its pid file is
        found too) and remove the folders. Idempotent."""
        for pid in _beam_pids(set(self.nodes)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tails(self, lines: int = 40) -> str:
        """The end of every node's own log, for a test's failure message."""
        return "\n".join(f"--- {n.name}\n{_log_tail(n, lines)}" for n in self._nodes)

    # --- state ------------------------------------------------------------------------------

    def running_nodes(self, seen_by: str) -> set[str]:
        """The cluster's running nodes as ``seen_by`` sees them."""
        out = self._ctl(self._node(seen_by), "cluster_status", "--formatter", "json")
        return set(json.loads(out).get("running_nodes", []))

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Every node runs, and each sees all of them running."""
        want = set(self.nodes)

        def whole() -> bool:
            try:
                seen = _parallel([functools.partial(self.running_nodes, n) for n in self.nodes])
            except (ClusterError, subprocess.SubprocessError, ValueError):
                return False
            return all(s == want for s in seen)

        _until(whole, timeout or self.timeout_s, f"cluster {sorted(want)} to be whole")

    def add_vhost(self, vhost: str, user: str = "guest") -> None:
        n = self._any_running()
        self._ctl(n, "add_vhost", vhost)
        self._ctl(n, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def _queue_info(self, queue: str, vhost: str) -> dict[str, object]:
        out = self._ctl(self._any_running(), "list_queues", "-p", vhost, "name", "type",
                        "leader", "members", "online", "--formatter", "json")
        for row in json.loads(out):
            if row.get("name") == queue:
                return dict(row)
        raise ClusterError(f"no queue {queue!r} in vhost {vhost!r}")

    def leader_of(self, queue: str, vhost: str = "/") -> str:
        """The node leading quorum queue ``queue`` (as a surviving node reports it)."""
        leader = self._queue_info(queue, vhost).get("leader")
        if not isinstance(leader, str) or leader not in self._by_name:
            raise ClusterError(f"{queue!r} has no leader among {self.nodes}: {leader!r}")
        return leader

    def members_of(self, queue: str, vhost: str = "/") -> set[str]:
        return set(_strings(self._queue_info(queue, vhost).get("members")))

    def online_members_of(self, queue: str, vhost: str = "/") -> set[str]:
        return set(_strings(self._queue_info(queue, vhost).get("online")))

    def wait_leader_elected(self, queue: str, vhost: str = "/", *, not_on: str | None = None,
                            timeout: float | None = None) -> str:
        """Wait until ``queue`` has a leader (other than ``not_on``) and return it."""
        found: list[str] = []

        def elected() -> bool:
            try:
                leader = self.leader_of(queue, vhost)
            except (ClusterError, subprocess.SubprocessError, ValueError):
                return False
            if leader == not_on or not self.is_running(leader):
                return False
            found.append(leader)
            return True

        _until(elected, timeout or self.timeout_s, f"a new leader of {queue}")
        return found[-1]

    # --- rabbitmqctl ------------------------------------------------------------------------

    def _any_running(self) -> _Node:
        for n in self._nodes:
            if self.is_running(n.name):
                return n
        raise ClusterError("no node of the cluster is running")

    def _ctl(self, node: _Node, *args: str) -> str:
        proc = subprocess.run([CTL, "-q", "-n", node.name, *args], capture_output=True,
                              text=True, timeout=self.timeout_s)
        if proc.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)} exited "
                               f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[:500]}")
        return proc.stdout


def _log_tail(node: _Node, lines: int = 40) -> str:
    """The end of a node's own log files: why a boot failed is there, not in rabbitmqctl's
    answer."""
    tails = []
    for log in sorted((node.dir / "log").glob("*.log")):
        with contextlib.suppress(OSError):
            tails.append(f"[{log.name}]\n" + "\n".join(log.read_text(errors="replace")
                                                       .splitlines()[-lines:]))
    return "\n".join(tails) or "(no log files)"


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _beam_pids(names: set[str]) -> list[int]:
    """Pids of the beam processes whose ``RABBITMQ_NODENAME`` is one of ``names``."""
    wanted = {f"RABBITMQ_NODENAME={n}".encode() for n in names}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if "beam" not in os.readlink(entry / "exe"):
                continue
            if wanted & set((entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) is as dead as a node gets
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _parallel(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run blocking calls on threads and return their results; the first error is raised
    once all have ended."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]
