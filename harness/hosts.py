"""Hosts as network namespaces: real processes on separate network stacks, joined by a bridge.

Why: a partition between machines (one host cut off while the others go on) and a round-trip
time between workers and Redis cannot be made on one loopback. Here every host is a network
namespace (`ip netns add`) with one veth pair whose other end sits on a bridge in the root
namespace; each host has its own address in a private /24 (10.77.N.0/24, N picked free for
this run) and no default route, so nothing leaves the namespaces and the bridge: no NAT, no
forwarding. The root namespace gets the subnet's .254 on the bridge, so the test process
itself can talk to every host (as one more machine on the same switch).

Faults:
- cut(host): the host's veth end leaves the bridge (a pulled cable: its packets go nowhere,
  nothing is reset, timers decide); heal(host) puts it back.
- a delay between hosts and a Redis: start_proxy() runs harness/faultproxy.py's FaultProxy
  as a process inside the Redis host's namespace (the kernel here has no netem), listening on
  the host's address and forwarding to the server on that host's loopback; Proxy.delay(ms)
  holds every chunk ms in each direction (one round trip = 2 x ms).

Names carry a short random tag (bridge hb-<tag>, namespaces ho-<tag>-<i>, veths hv<tag><i>),
so parallel test workers never collide. Everything is torn down by stop(): the context
manager, the pytest fixture's finalizer and an atexit hook all call it, also when a test
fails. Needs root (ip netns); `need_root()` says why in one line when it is not.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from handoff.connection.embedded_server import find_server_binary
from harness import procs

ROOT = procs.ROOT
SUBNET_PREFIX = "10.77"
ROOT_SUFFIX = 254  # the root namespace's address on the bridge
SKIP_REASON = "network namespaces need root (ip netns)"


def need_root() -> str | None:
    """None when hosts can be built here, else the one-line reason to skip."""
    if os.geteuid() != 0:
        return SKIP_REASON
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return SKIP_REASON
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _free_subnet() -> int:
    """A third octet N such that no address of the root namespace is in 10.77.N.0/24."""
    used = set(re.findall(rf"{SUBNET_PREFIX}\.(\d+)\.", _ip("-4", "-o", "addr").stdout))
    for _ in range(200):
        n = secrets.randbelow(250) + 1
        if str(n) not in used:
            return n
    raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 subnet")


@dataclass
class Host:
    """One machine: a namespace, its address, and the bridge end of its cable."""

    name: str  # as the test calls it
    ns: str
    addr: str
    cable: str  # the veth end on the bridge (root namespace)
    cut: bool = False

    @property
    def prefix(self) -> tuple[str, ...]:
        """Words that run a command on this host."""
        return ("ip", "netns", "exec", self.ns)


@dataclass
class RedisOnHost:
    """A redis-server (or sentinel) process started on a host."""

    host: Host
    port: int
    proc: subprocess.Popen
    folder: Path

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host.addr, self.port)

    @property
    def url(self) -> str:
        return f"redis://{self.host.addr}:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host=self.host.addr, port=self.port, **kwargs)

    def stop(self) -> None:
        _kill_group(self.proc)


class Proxy:
    """A FaultProxy process inside a host's namespace (harness/hostproxy.py)."""

    def __init__(self, host: Host, listen_port: int, upstream: tuple[str, int]) -> None:
        self.host = host
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), str(ROOT)])}
        target = f"{upstream[0]}:{upstream[1]}"
        self.proc = subprocess.Popen(
            [*host.prefix, sys.executable, "-m", "harness.hostproxy",
             "--listen", f"{host.addr}:{listen_port}", "--upstream", target],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            _kill_group(self.proc)
            raise RuntimeError(f"proxy on {host.name} did not start: {line}")
        self.port = int(line[1])

    @property
    def url(self) -> str:
        return f"redis://{self.host.addr}:{self.port}/0"

    def _say(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"proxy: {command}: {answer or 'no answer'}")

    def delay(self, ms: float) -> None:
        self._say(f"delay {ms}")

    def blackhole(self) -> None:
        self._say("blackhole")

    def heal(self) -> None:
        self._say("heal")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


_RUNNING: list[Hosts] = []


@atexit.register
def _stop_leftovers() -> None:
    for hosts in list(_RUNNING):
        hosts.stop()


@dataclass
class Hosts:
    """N hosts on one bridge. Use as a context manager (or call stop())."""

    names: list[str]
    folder: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    hosts: dict[str, Host] = field(default_factory=dict)
    _processes: list = field(default_factory=list)
    _stopped: bool = False

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bridge = f"hb-{self.tag}"
        _RUNNING.append(self)
        try:
            self._build()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- building and tearing down ---------------------------------------------------------

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        for _ in range(10):  # another run may pick the same subnet at the same instant
            self.subnet = f"{SUBNET_PREFIX}.{_free_subnet()}"
            _ip("addr", "add", f"{self.subnet}.{ROOT_SUFFIX}/24", "dev", self.bridge)
            if _ip("-4", "-o", "addr").stdout.count(f" {self.subnet}.") == 1:
                break
            _ip("addr", "del", f"{self.subnet}.{ROOT_SUFFIX}/24", "dev", self.bridge)
        else:
            raise RuntimeError(f"no {SUBNET_PREFIX}.N.0/24 subnet stayed free")
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names, start=1):
            ns, inner, cable = (
                f"ho-{self.tag}-{index}",
                f"hi{self.tag}{index}",
                f"hv{self.tag}{index}",
            )
            host = Host(name, ns, f"{self.subnet}.{index}", cable)
            self.hosts[name] = host
            _ip("netns", "add", ns)
            _ip("link", "add", inner, "type", "veth", "peer", "name", cable)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("link", "set", cable, "master", self.bridge)
            _ip("link", "set", cable, "up")

    def stop(self) -> None:
        """Stop every process started here, delete the namespaces, veths and the bridge.
        Idempotent; never raises (it runs in finalizers)."""
        if self._stopped:
            return
        self._stopped = True
        for process in reversed(self._processes):
            with contextlib.suppress(Exception):
                process.stop()
        for host in self.hosts.values():
            # anything still running inside (a worker that outlived its supervisor)
            pids = _ip("netns", "pids", host.ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", host.ns, check=False)  # takes the veth pair with it
            _ip("link", "del", host.cable, check=False)
        _ip("link", "del", self.bridge, check=False)
        _RUNNING[:] = [running for running in _RUNNING if running is not self]

    def leftovers(self) -> list[str]:
        """Names of this run's namespaces and links that still exist (empty after stop())."""
        names = _ip("netns", "list", check=False).stdout + _ip("-o", "link", check=False).stdout
        return sorted(
            set(re.findall(rf"\b(?:ho-{self.tag}-\d+|hv{self.tag}\d+|hb-{self.tag})\b", names))
        )

    # -- faults ----------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Pull the host's cable: its end leaves the bridge (nothing is reset)."""
        host = self.hosts[name]
        _ip("link", "set", host.cable, "nomaster")
        host.cut = True

    def heal(self, name: str) -> None:
        host = self.hosts[name]
        _ip("link", "set", host.cable, "master", self.bridge)
        _ip("link", "set", host.cable, "up")
        host.cut = False

    # -- processes on hosts ----------------------------------------------------------------

    def run(
        self, name: str, argv: list[str], timeout_s: float = 20, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command on the host to its end; its output is returned as text."""
        return subprocess.run(
            [*self.hosts[name].prefix, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )

    def handoff(
        self, name: str, args: list[str], env: dict[str, str], label: str = ""
    ) -> procs.HandoffProcess:
        """`python -m handoff ARGS` on the host (e.g. a supervisor), stopped by stop()."""
        log = self.folder / f"{name}-{label or args[0]}-{len(self._processes)}.log"
        process = procs.HandoffProcess(args, env, log, prefix=self.hosts[name].prefix)
        self._processes.append(process)
        return process

    def redis(self, name: str, port: int = 6379, extra: list[str] | None = None) -> RedisOnHost:
        """A redis-server on the host, listening on the host's address and its loopback."""
        host = self.hosts[name]
        folder = self.folder / f"redis-{name}-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            find_server_binary(), "--port", str(port), "--bind", host.addr, "127.0.0.1",
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--maxmemory-policy", "noeviction", "--dir", str(folder),
            "--logfile", str(folder / "server.log"),
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            *(extra or []),
        ]  # fmt: skip
        return self._start_server(host, port, args, folder)

    def sentinel(self, name: str, conf_lines: list[str], port: int = 26379) -> RedisOnHost:
        """A sentinel on the host with the given config lines (port, bind, dir added)."""
        host = self.hosts[name]
        folder = self.folder / f"sentinel-{name}-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        head = [f"port {port}", f"bind {host.addr} 127.0.0.1", "protected-mode no",
                f"dir {folder}", f"logfile {folder / 'sentinel.log'}"]  # fmt: skip
        conf.write_text("\n".join(head + conf_lines) + "\n")
        return self._start_server(
            host, port, [find_server_binary(), str(conf), "--sentinel"], folder
        )

    def _start_server(self, host: Host, port: int, args: list[str], folder: Path) -> RedisOnHost:
        proc = subprocess.Popen(
            [*host.prefix, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        server = RedisOnHost(host, port, proc, folder)
        self._processes.append(server)

        def answers() -> bool:
            if proc.poll() is not None:
                log = next(folder.glob("*.log"), None)
                tail = log.read_text(errors="replace")[-300:] if log else ""
                raise RuntimeError(f"server on {host.name}:{port} exited: {tail}")
            with server.client() as client:
                return client.ping()

        procs.wait_until(answers, 10, f"the server on {host.name}:{port}",
                         not_yet=(redis.RedisError, OSError))  # fmt: skip
        return server

    def proxy(self, name: str, upstream_port: int, listen_port: int = 0) -> Proxy:
        """A delaying proxy on the host, in front of a server on that host's loopback."""
        proxy = Proxy(self.hosts[name], listen_port, ("127.0.0.1", upstream_port))
        self._processes.append(proxy)
        return proxy


def sentinel_trio(
    hosts: Hosts,
    servers: tuple[str, str],
    sentinels: tuple[str, str, str],
    service: str = "handoff",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
) -> tuple[list[RedisOnHost], list[RedisOnHost]]:
    """A primary on servers[0], its replica on servers[1], and three sentinels (quorum 2) on
    the given hosts; returns once every sentinel sees the replica and the two others (the
    same readiness harness/topologies.py waits for, over the hosts' addresses)."""
    primary = hosts.redis(servers[0])
    replica = hosts.redis(servers[1], extra=["--replicaof", primary.host.addr, str(primary.port)])

    def replica_up() -> bool:
        with replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    procs.wait_until(replica_up, 10, "the replica to sync", not_yet=(redis.RedisError, OSError))
    ids = [secrets.token_hex(20) for _ in sentinels]
    trio = []
    for index, name in enumerate(sentinels):
        lines = [
            f"sentinel myid {ids[index]}",
            f"sentinel monitor {service} {primary.host.addr} {primary.port} 2",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel known-replica {service} {replica.host.addr} {replica.port}",
        ]
        lines += [
            f"sentinel known-sentinel {service} {hosts[other].addr} 26379 {ids[j]}"
            for j, other in enumerate(sentinels)
            if j != index
        ]
        trio.append(hosts.sentinel(name, lines))

    def ready() -> bool:
        for sentinel in trio:
            with sentinel.client() as c:
                replicas = c.execute_command("SENTINEL", "REPLICAS", service)
                peers = c.execute_command("SENTINEL", "SENTINELS", service)
            if len(replicas) != 1 or len(peers) != 2:
                return False
            for entry in [*replicas, *peers]:
                flags = _entry(entry).get("flags", "")
                if {"s_down", "o_down", "disconnected"} & set(flags.split(",")):
                    return False
        return True

    procs.wait_until(ready, 15, "every sentinel to see the replica and the others",
                     not_yet=(redis.RedisError, OSError))  # fmt: skip
    return [primary, replica], trio


def _entry(reply) -> dict[str, str]:
    def text(v) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {text(k): text(v) for k, v in items}


def sentinel_url(trio: list[RedisOnHost], service: str = "handoff") -> str:
    return "redis+sentinel://" + ",".join(f"{s.host.addr}:{s.port}" for s in trio) + f"/{service}"


def primary_by_majority(trio: list[RedisOnHost], service: str = "handoff") -> str | None:
    """The primary address (host:port) a majority of the reachable sentinels name, or None."""
    votes: dict[str, int] = {}
    for sentinel in trio:
        if sentinel.host.cut:  # unreachable from here too: asking would only wait
            continue
        try:
            with sentinel.client(socket_timeout=0.5, socket_connect_timeout=0.5, retry=None) as c:
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
        except (redis.RedisError, OSError):
            continue
        if addr:
            key = f"{_entry([b'h', addr[0]])['h']}:{int(addr[1])}"
            votes[key] = votes.get(key, 0) + 1
    for key, count in votes.items():
        if count >= 2:
            return key
    return None


def wait_seconds(condition, timeout_s: float, what: str, step_s: float = 0.05) -> float:
    """wait_until, returning how long it took (seconds)."""
    began = time.monotonic()
    procs.wait_until(condition, timeout_s, what, step_s, not_yet=(redis.RedisError, OSError))
    return time.monotonic() - began
