"""Local Redis Cluster and Sentinel topologies for tests, started from the server binary.

Why: redirections (MOVED/ASK), live slot migration and Sentinel failover are only worth testing
against real servers. Every process listens on a free loopback port, keeps its files in its own
subfolder of the folder the caller passes in, and is stopped by `stop()`. The cluster is built
with plain commands (no redis-cli) so that the same code runs on valkey-server 8.x and
redis-server 7.x. Nothing sleeps for a fixed time: every step waits on a condition with a
deadline and names what it waited for when it gives up.
"""

from __future__ import annotations

import atexit
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster

from handoff.connection.embedded_server import ServerProcess, find_server_binary, server_args
from handoff.errors import HandoffError
from harness import procs

__all__ = [
    "LocalCluster",
    "LocalSentinelGroup",
    "free_tcp_port",
    "start_cluster",
    "start_sentinel_group",
    "wait_until",
]

HOST = "127.0.0.1"
SLOT_COUNT = 16384
POLL_S = 0.02
MIGRATE_TIMEOUT_MS = 5000
START_ATTEMPTS = 3
# Options for every data server. A zero diskless-sync delay makes a replica's first full sync
# start at once instead of after the default 5 s; `shutdown-on-sigterm now` lets a primary exit
# on SIGTERM without first waiting (up to shutdown-timeout) for lagging replicas.
COMMON_EXTRA = [
    "--repl-diskless-sync", "yes",
    "--repl-diskless-sync-delay", "0",
    "--shutdown-on-sigterm", "now",
]  # fmt: skip

T = TypeVar("T")


free_tcp_port = procs.free_tcp_port


def wait_until(
    predicate: Callable[[], T | None], timeout_s: float, what: str, step_s: float = POLL_S
) -> T:
    """procs.wait_until, with Redis and socket errors counting as "not yet": a node may be
    restarting or failing over."""
    return procs.wait_until(predicate, timeout_s, what, step_s, not_yet=(redis.RedisError, OSError))


# -- processes -------------------------------------------------------------------------------


class _PortPool:
    """Hands out free ports, never the same one twice within one topology (processes are
    started from several threads at once, hence the lock)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.lock = threading.Lock()

    def take(self) -> int:
        with self.lock:
            while True:
                port = free_tcp_port()
                if port not in self.taken:
                    self.taken.add(port)
                    return port


def _log_tail(log_file: Path, chars: int = 400) -> str:
    """The end of a server's log: start errors (port in use...) go there, not to stderr."""
    try:
        return log_file.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


PORT_TAKEN = "port taken"


def _start_checked(server: ServerProcess, log_file: Path) -> ServerProcess:
    """server.start(), then make sure the PING was answered by this process and not by some
    other server that took the port first (ours then fails to bind and exits). A failure
    raises HandoffError quoting the log; PORT_TAKEN in its message says a retry may help."""
    try:
        server.start()
        with redis.Redis(host=HOST, port=server.port, socket_timeout=2) as client:
            pid = client.info("server").get("process_id")
        if pid != server.proc.pid:
            raise HandoffError(f"{PORT_TAKEN}: port {server.port} answered by process {pid}")
    except HandoffError as exc:
        server.stop(sig_kill=True)
        tail = _log_tail(log_file)
        taken = PORT_TAKEN if "in use" in tail or PORT_TAKEN in str(exc) else "failed"
        raise HandoffError(f"{taken}: {exc}; log {log_file}: {tail}") from exc
    return server


def _start_process(build: Callable[[], tuple[ServerProcess, Path]]) -> ServerProcess:
    """Start the process build() describes, retrying with new ports if it could not bind.

    A port from free_tcp_port() is free when picked but may be taken before the server binds
    it (another test worker, an outgoing connection); build() picks new ports on each call.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        server, log_file = build()
        try:
            return _start_checked(server, log_file)
        except HandoffError as exc:
            if not str(exc).startswith(PORT_TAKEN) or attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _is_alive(server: ServerProcess) -> bool:
    return server.proc is not None and server.proc.poll() is None


def _stop_all(servers: Iterable[ServerProcess]) -> None:
    """SIGTERM every live process first, then reap each: stopping costs one shutdown, not N."""
    servers = list(servers)
    for server in servers:
        if _is_alive(server):
            server.proc.terminate()
    for server in servers:
        server.stop()


def _start_all(starters: list[Callable[[], ServerProcess]]) -> list[ServerProcess]:
    """Run every starter at once (each waits for its own PING) and return their processes in
    order. If any fails, stop the ones that started and raise the first error.

    Why parallel: a cluster node counts its 2 s "writable delay" from its own start, and a
    sentinel that cannot reach a peer at its first attempt retries only a second later.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(starters))) as pool:
        futures = [pool.submit(starter) for starter in starters]
    started, errors = [], []
    for future in futures:
        error = future.exception()
        if error is None:
            started.append(future.result())
        else:
            errors.append(error)
    if errors:
        _stop_all(started)
        raise errors[0]
    return started


_RUNNING: list[LocalCluster | LocalSentinelGroup] = []


def _forget(topology: LocalCluster | LocalSentinelGroup) -> None:
    """Drop a stopped topology from _RUNNING (by identity: dataclass == compares fields)."""
    _RUNNING[:] = [running for running in _RUNNING if running is not topology]


@atexit.register
def _stop_leftovers() -> None:
    """Servers run in their own session, so a test run that never reached stop() (an
    interrupted fixture) would leave them behind; stop them when the interpreter exits."""
    for topology in list(_RUNNING):
        topology.stop()


def _raw(client: redis.Redis, *args: object) -> object:
    """Run a command with its words as separate arguments: redis-py then applies no response
    callback (they are keyed by "CLUSTER NODES" etc., not "CLUSTER"), so replies do not depend
    on the redis-py version. Not for INFO, which has a callback of its own."""
    return client.execute_command(*args)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_fields(text: str) -> dict[str, str]:
    """Parse 'key:value' lines (CLUSTER INFO, INFO sections)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _replication(server_port: int) -> dict[str, object]:
    """INFO replication of one server, parsed by redis-py (numbers come back as int)."""
    with _plain_client(server_port) as client:
        return client.info("replication")


def _plain_client(port: int, **kwargs: object) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("socket_connect_timeout", 2)
    return redis.Redis(host=HOST, port=port, **kwargs)


def _data_server(
    binary: str, folder: Path, ports: _PortPool, extra: Callable[[], list[str]] | None = None
) -> ServerProcess:
    """Start one data server with its own folder and log file; extra() adds options (it is
    called again on a retry so it may pick new ports)."""
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / "server.log"

    def build() -> tuple[ServerProcess, Path]:
        port = ports.take()
        more = ["--logfile", str(log_file), *COMMON_EXTRA, *(extra() if extra else [])]
        args = server_args(binary, port=port, data_dir=str(folder), extra=more)
        return ServerProcess(args=args, port=port), log_file

    return _start_process(build)


# -- cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeLine:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str
    slots: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> _NodeLine:
        # <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        words = line.split()
        address = words[1].split("@", 1)[0]
        return cls(
            node_id=words[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(words[2].split(",")),
            master_id=words[3],
            slots=tuple(words[8:]),
        )


def _cluster_nodes(port: int) -> list[_NodeLine]:
    with _plain_client(port) as client:
        text = _text(_raw(client, "CLUSTER", "NODES"))
    return [_NodeLine.parse(line) for line in text.splitlines() if line.strip()]


def _myself(port: int) -> _NodeLine:
    return next(line for line in _cluster_nodes(port) if "myself" in line.flags)


def _cluster_info(port: int) -> dict[str, str]:
    with _plain_client(port) as client:
        return _info_fields(_text(_raw(client, "CLUSTER", "INFO")))


SlotMap = tuple[tuple[int, int, int, tuple[int, ...]], ...]


def _slot_map(port: int) -> SlotMap:
    """This node's view of the slots: sorted (first, last, primary port, replica ports)."""
    with _plain_client(port) as client:
        ranges = _raw(client, "CLUSTER", "SLOTS")
    view = []
    for first, last, primary, *replicas in ranges:
        replica_ports = tuple(sorted(int(replica[1]) for replica in replicas))
        view.append((int(first), int(last), int(primary[1]), replica_ports))
    return tuple(sorted(view))


def _owner_in(view: SlotMap, slot: int) -> int | None:
    return next((port for first, last, port, _ in view if first <= slot <= last), None)


def _slot_ranges(count: int) -> list[tuple[int, int]]:
    """Split 0..16383 into `count` contiguous ranges, as redis-cli --cluster create does."""
    bounds = [round(i * SLOT_COUNT / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]


def _add_slots(client: redis.Redis, first: int, last: int) -> None:
    """ADDSLOTSRANGE (7.0+), or ADDSLOTS with every slot on a server that lacks it."""
    try:
        _raw(client, "CLUSTER", "ADDSLOTSRANGE", first, last)
    except redis.ResponseError as exc:
        if "unknown" not in str(exc).lower():
            raise
        _raw(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))


def _cluster_node(
    binary: str, folder: Path, ports: _PortPool, node_timeout_ms: int
) -> ServerProcess:
    """One cluster-enabled server. The bus port is passed explicitly so port+10000 (which may
    be taken or out of range) never matters."""

    def extra() -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(folder / "nodes.conf"),
            "--cluster-port", str(ports.take()),
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip

    return _data_server(binary, folder, ports, extra)


@dataclass
class LocalCluster:
    """A Redis Cluster of local processes: `primaries` own the slots at start, each primary
    i has the replicas replicas[i*k:(i+1)*k]. After a failover or a migration the roles and
    owners may move: methods that need the current owner ask the cluster, not these lists."""

    primaries: list[ServerProcess]
    replicas: list[ServerProcess]

    @property
    def nodes(self) -> list[ServerProcess]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """The handoff URL with every initial primary as a seed."""
        seeds = ",".join(f"{HOST}:{server.port}" for server in self.primaries)
        return f"redis+cluster://{seeds}"

    def client(self, **kwargs: object) -> RedisCluster:
        """A new RedisCluster seeded with the initial primaries; the caller closes it."""
        seeds = [ClusterNode(HOST, server.port) for server in self.primaries]
        return RedisCluster(startup_nodes=seeds, **kwargs)

    def node_client(self, port: int, **kwargs: object) -> redis.Redis:
        """A plain (non-cluster) client on one node, for admin commands; the caller closes it."""
        return _plain_client(port, **kwargs)

    def node_id(self, port: int) -> str:
        """CLUSTER MYID of the node on port (what SETSLOT NODE / REPLICATE take)."""
        with self.node_client(port) as client:
            return _text(_raw(client, "CLUSTER", "MYID"))

    def _live_ports(self) -> list[int]:
        return [server.port for server in self.nodes if _is_alive(server)]

    def _primary_ports(self) -> list[int]:
        """Live nodes that are primaries now (a replica may have been promoted)."""
        return [port for port in self._live_ports() if "master" in _myself(port).flags]

    def owner_port(self, slot: int) -> int:
        """The primary serving the slot, as most live nodes see it in CLUSTER SLOTS."""
        votes: Counter[int] = Counter()
        for port in self._live_ports():
            try:
                owner = _owner_in(_slot_map(port), slot)
            except (redis.RedisError, OSError):
                continue
            if owner is not None:
                votes[owner] += 1
        if not votes:
            raise AssertionError(f"no live node names an owner for slot {slot}")
        return votes.most_common(1)[0][0]

    def flushall(self) -> None:
        """Empty every primary (replicas follow)."""
        for port in self._primary_ports():
            with self.node_client(port) as client:
                client.flushall()

    def _claimed_by(self, slot: int) -> int:
        """The primary that says the slot is its own (the authority during a migration)."""
        for port in self._primary_ports():
            if any(_slot_in(entry, slot) for entry in _myself(port).slots):
                return port
        raise AssertionError(f"no live primary claims slot {slot}")

    def migrate_slot(self, slot: int, target_port: int, *, batch: int = 50) -> int:
        """Move one slot to target_port with its keys while clients keep using it, the way
        redis-cli --cluster reshard does: IMPORTING on the target, MIGRATING on the source,
        MIGRATE the keys in batches (without REPLACE: a key already on the target is a bug
        worth an error), then SETSLOT NODE on target, source and every other primary.
        Returns the number of keys moved; waits until every live node names the new owner."""
        source_port = self._claimed_by(slot)
        if source_port == target_port:
            return 0
        target_id, source_id = self.node_id(target_port), self.node_id(source_port)
        with self.node_client(target_port) as target:
            _raw(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        with self.node_client(source_port) as source:
            _raw(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            moved = _move_keys(source, slot, target_port, batch)
        others = [p for p in self._primary_ports() if p not in (target_port, source_port)]
        for port in [target_port, source_port, *others]:
            with self.node_client(port) as client:
                _raw(client, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(
            lambda: all(_owner_in(_slot_map(p), slot) == target_port for p in self._live_ports()),
            10.0,
            f"every node to see slot {slot} on port {target_port}",
        )
        return moved

    def _settled(self) -> bool:
        ports = self._live_ports()
        if any(_cluster_info(port).get("cluster_state") != "ok" for port in ports):
            return False
        if any(_has_open_slots(_myself(port)) for port in ports):
            return False
        views = {_slot_map(port) for port in ports}
        return len(views) == 1 and _covers_all(next(iter(views)))

    def wait_settled(self, timeout_s: float = 10.0) -> None:
        """Until every live node says cluster_state:ok, no slot is half-migrated, and all agree
        on the slot owners and their replicas (so any node can be asked and gives one answer)."""
        wait_until(self._settled, timeout_s, "the cluster to settle (state ok, one slot map)")

    def stop(self) -> None:
        """Stop every process, all at once (shutdown-on-sigterm now: no primary waits for its
        replicas). Idempotent; also fine after some nodes were killed."""
        _stop_all([*self.replicas, *self.primaries])
        _forget(self)


def _slot_in(entry: str, slot: int) -> bool:
    """Whether a CLUSTER NODES slot entry ("5", "0-5460"; not "[5->-id]") covers slot."""
    if entry.startswith("["):
        return False
    first, _, last = entry.partition("-")
    return int(first) <= slot <= int(last or first)


def _has_open_slots(line: _NodeLine) -> bool:
    """A slot left MIGRATING/IMPORTING shows as "[slot->-id]" / "[slot-<-id]"."""
    return any(entry.startswith("[") for entry in line.slots)


def _covers_all(view: SlotMap) -> bool:
    return sum(last - first + 1 for first, last, _, _ in view) == SLOT_COUNT


def _move_keys(source: redis.Redis, slot: int, target_port: int, batch: int) -> int:
    """MIGRATE the slot's keys from source in batches until it holds none.

    Terminates under concurrent writes: a MIGRATING source answers ASK for any key it does not
    hold, so clients create new keys on the target and the source only ever loses keys.
    """
    moved = 0
    while True:
        keys = _raw(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            return moved
        reply = _raw(source, "MIGRATE", HOST, target_port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys)
        if _text(reply) == "OK":
            moved += len(keys)


def _assign_slots(primaries: list[ServerProcess]) -> None:
    """Give each primary a distinct config epoch (as redis-cli does, so no epoch collision has
    to be resolved by gossip) and one contiguous slot range."""
    for epoch, (server, (first, last)) in enumerate(
        zip(primaries, _slot_ranges(len(primaries)), strict=True), start=1
    ):
        with _plain_client(server.port) as client:
            _raw(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            _add_slots(client, first, last)


def _bus_port(server: ServerProcess) -> int:
    return int(server.args[server.args.index("--cluster-port") + 1])


def _meet_all(nodes: list[ServerProcess], timeout_s: float) -> None:
    """CLUSTER MEET every pair of nodes: gossip alone would take a cron round (~1 s) per hop
    to introduce the nodes the first one met to each other."""
    for node in nodes:
        with _plain_client(node.port) as client:
            for other in nodes:
                if other is not node:
                    _raw(client, "CLUSTER", "MEET", HOST, other.port, _bus_port(other))
    wait_until(
        partial(_all_know_each_other, nodes),
        timeout_s,
        f"every node to know all {len(nodes)} nodes by id",
    )


def _all_know_each_other(nodes: list[ServerProcess]) -> bool:
    """Every node lists exactly the others' ids, no entry still in handshake. (The count in
    CLUSTER INFO is not enough: handshake entries have random ids and count too.)"""
    ids = {_myself(node.port).node_id for node in nodes}
    for node in nodes:
        lines = _cluster_nodes(node.port)
        if any(line.flags & {"handshake", "noaddr"} for line in lines):
            return False
        if {line.node_id for line in lines} != ids:
            return False
    return True


def _attach_replicas(cluster: LocalCluster, per_primary: int, timeout_s: float) -> None:
    """CLUSTER REPLICATE each replica to its primary, then wait for the replication links."""
    for index, replica in enumerate(cluster.replicas):
        primary = cluster.primaries[index // per_primary]
        with _plain_client(replica.port) as client:
            _raw(client, "CLUSTER", "REPLICATE", cluster.node_id(primary.port))
    for replica in cluster.replicas:
        wait_until(
            lambda replica=replica: _replication(replica.port).get("master_link_status") == "up",
            timeout_s,
            f"replica {replica.port} to sync with its primary",
        )


def start_cluster(
    folder: Path, *, primaries: int = 3, replicas_per_primary: int = 0, node_timeout_ms: int = 2000
) -> LocalCluster:
    """Start and build a cluster under folder; return once it is settled (every node agrees).

    On any failure the processes already started are stopped before the error propagates.
    """
    binary = find_server_binary()
    ports = _PortPool()
    cluster = LocalCluster(primaries=[], replicas=[])
    _RUNNING.append(cluster)
    timeout_s = 10.0 + node_timeout_ms / 1000
    try:
        names = [f"primary-{i}" for i in range(primaries)]
        names += [f"replica-{i}" for i in range(primaries * replicas_per_primary)]
        nodes = _start_all(
            [
                partial(_cluster_node, binary, folder / name, ports, node_timeout_ms)
                for name in names
            ]
        )
        cluster.primaries[:] = nodes[:primaries]
        cluster.replicas[:] = nodes[primaries:]
        _assign_slots(cluster.primaries)
        _meet_all(cluster.nodes, timeout_s)
        if replicas_per_primary:
            _attach_replicas(cluster, replicas_per_primary, timeout_s)
        cluster.wait_settled(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# -- sentinel ---------------------------------------------------------------------------------


def _pairs(reply: dict | list) -> dict[str, str]:
    """A SENTINEL REPLICAS/SENTINELS entry as a dict of text: a map under RESP3 (redis-py 8's
    default), a flat [k1, v1, k2, v2...] list under RESP2."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {_text(key): _text(value) for key, value in items}


def _sentinel_entries(port: int, kind: str, service: str) -> list[dict[str, str]]:
    """SENTINEL REPLICAS|SENTINELS <service> on one sentinel, parsed without redis-py."""
    with _plain_client(port) as client:
        return [_pairs(entry) for entry in _raw(client, "SENTINEL", kind, service)]


def _healthy(entry: dict[str, str]) -> bool:
    flags = set(entry.get("flags", "").split(","))
    return not flags & {"s_down", "o_down", "disconnected"}


@dataclass(frozen=True)
class _SentinelSeat:
    """What one sentinel is before it starts: its port and the run id we give it (so the
    others can be told about it in their config instead of waiting for hello messages)."""

    port: int
    run_id: str


def _sentinel_conf(
    seat: _SentinelSeat,
    others: list[_SentinelSeat],
    folder: Path,
    service: str,
    servers: tuple[int, int],
    timings: tuple[int, int],
) -> str:
    """sentinel.conf for one sentinel. The known-sentinel/known-replica lines are what a
    sentinel itself writes on config rewrite; seeding them saves the ~2 s of hello messages
    it otherwise takes before the sentinels know each other and can elect a leader."""
    primary_port, replica_port = servers
    down_after_ms, failover_timeout_ms = timings
    lines = [
        f"port {seat.port}",
        f"bind {HOST}",
        "protected-mode no",
        f"dir {folder}",
        f"logfile {folder / 'sentinel.log'}",
        f"sentinel myid {seat.run_id}",
        f"sentinel monitor {service} {HOST} {primary_port} 2",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel known-replica {service} {HOST} {replica_port}",
    ]
    lines += [f"sentinel known-sentinel {service} {HOST} {o.port} {o.run_id}" for o in others]
    return "\n".join(lines) + "\n"


@dataclass
class LocalSentinelGroup:
    """One primary, one replica and three sentinels (quorum 2) monitoring them as `service`.
    `servers` keeps the start order [initial primary, replica]; who is primary now is what
    the sentinels say (primary_port())."""

    service: str
    servers: list[ServerProcess]
    sentinels: list[ServerProcess]

    @property
    def url(self) -> str:
        """The handoff URL naming every sentinel and the service."""
        seeds = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{seeds}/{self.service}"

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) pairs, as redis.sentinel.Sentinel takes them."""
        return [(HOST, sentinel.port) for sentinel in self.sentinels]

    def _agreed_primary(self) -> int | None:
        """The primary port named by a majority of all sentinels, or None."""
        votes: Counter[int] = Counter()
        for sentinel in self.sentinels:
            if not _is_alive(sentinel):
                continue
            try:
                with _plain_client(sentinel.port) as client:
                    reply = _raw(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (redis.RedisError, OSError):
                continue
            if reply:
                votes[int(reply[1])] += 1
        if not votes:
            return None
        port, count = votes.most_common(1)[0]
        return port if count > len(self.sentinels) // 2 else None

    def primary_port(self) -> int:
        """The primary's port as a majority of the sentinels names it now."""
        port = self._agreed_primary()
        if port is None:
            raise AssertionError(f"no majority of sentinels names a primary for {self.service}")
        return port

    def server(self, port: int) -> ServerProcess:
        """The data server (not sentinel) listening on port."""
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no server of this group on port {port}")

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, as a crash); return its port."""
        port = self.primary_port()
        self.server(port).stop(sig_kill=True)
        return port

    def _promoted(self, old_port: int) -> int | None:
        port = self._agreed_primary()
        if port is None or port == old_port:
            return None
        return port if _replication(port).get("role") == "master" else None

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Until a majority of sentinels names a primary other than old_port and that server
        itself says role:master (the sentinels switch their answer before the promoted server
        may have processed REPLICAOF NO ONE). Returns the new primary's port."""
        return wait_until(
            lambda: self._promoted(old_port),
            timeout_s,
            f"sentinels to fail over {self.service} away from port {old_port}",
        )

    def _replicas_synced(self) -> bool:
        primary = self.primary_port()
        live = [s for s in self.servers if _is_alive(s) and s.port != primary]
        if not live:
            raise AssertionError("no live replica to wait for")
        for server in live:
            info = _replication(server.port)
            if info.get("master_port") != primary or info.get("master_link_status") != "up":
                return False
        return True

    def wait_replica_synced(self, timeout_s: float = 10.0) -> None:
        """Until every live non-primary server replicates from the current primary with its
        link up. Raises at once if no replica is alive (e.g. right after a failover)."""
        wait_until(self._replicas_synced, timeout_s, "the replica to sync with the primary")

    def stop(self) -> None:
        """Stop the sentinels first (so they start no failover), then the servers. Idempotent."""
        _stop_all(self.sentinels)
        _stop_all(self.servers)
        _forget(self)


def _sentinel_ready(port: int, service: str, replica_port: int, others: int) -> bool:
    """The sentinel sees the primary up, the replica and every other sentinel connected."""
    replicas = _sentinel_entries(port, "REPLICAS", service)
    replica_ok = any(
        int(r.get("port", 0)) == replica_port
        and _healthy(r)
        and r.get("master-link-status") == "ok"
        for r in replicas
    )
    sentinels = [s for s in _sentinel_entries(port, "SENTINELS", service) if _healthy(s)]
    return replica_ok and len(sentinels) == others


def _start_sentinels(
    binary: str,
    group: LocalSentinelGroup,
    folder: Path,
    ports: _PortPool,
    timings: tuple[int, int],
) -> None:
    """Start three sentinels that already know each other (see _sentinel_conf).

    Their configs name each other's ports, so if one cannot bind its port all three are
    stopped and started again on new ports.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        seats = [_SentinelSeat(ports.take(), secrets.token_hex(20)) for _ in range(3)]
        starters = [
            partial(_sentinel, binary, group, folder / f"sentinel-{index}", seat, seats, timings)
            for index, seat in enumerate(seats)
        ]
        try:
            group.sentinels[:] = _start_all(starters)
            return
        except HandoffError as exc:
            if not str(exc).startswith(PORT_TAKEN) or attempt == START_ATTEMPTS:
                raise


def _sentinel(
    binary: str,
    group: LocalSentinelGroup,
    folder: Path,
    seat: _SentinelSeat,
    seats: list[_SentinelSeat],
    timings: tuple[int, int],
) -> ServerProcess:
    """Write one sentinel's config and start it."""
    folder.mkdir(parents=True, exist_ok=True)
    others = [other for other in seats if other is not seat]
    servers = (group.servers[0].port, group.servers[1].port)
    conf = folder / "sentinel.conf"
    conf.write_text(_sentinel_conf(seat, others, folder, group.service, servers, timings))
    sentinel = ServerProcess(args=[binary, str(conf), "--sentinel"], port=seat.port)
    return _start_checked(sentinel, folder / "sentinel.log")


def start_sentinel_group(
    folder: Path,
    *,
    service: str = "handoff",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
) -> LocalSentinelGroup:
    """Start a primary, a replica (--replicaof) and three sentinels with quorum 2; return once
    the replica is synced and every sentinel knows the replica and the two other sentinels, so
    that killing the primary leads to a quick failover.

    On any failure the processes already started are stopped before the error propagates.
    """
    binary = find_server_binary()
    ports = _PortPool()
    group = LocalSentinelGroup(service=service, servers=[], sentinels=[])
    _RUNNING.append(group)
    try:
        primary = _data_server(binary, folder / "server-0", ports)
        group.servers.append(primary)
        replica = _data_server(
            binary, folder / "server-1", ports, lambda: ["--replicaof", HOST, str(primary.port)]
        )
        group.servers.append(replica)
        wait_until(
            lambda: _replication(replica.port).get("master_link_status") == "up",
            10.0,
            "the replica to sync with the primary",
        )
        _start_sentinels(binary, group, folder, ports, (down_after_ms, failover_timeout_ms))
        wait_until(
            lambda: all(
                _sentinel_ready(s.port, service, replica.port, len(group.sentinels) - 1)
                for s in group.sentinels
            ),
            10.0,
            "every sentinel to see the replica and the other sentinels",
        )
    except BaseException:
        group.stop()
        raise
    return group
