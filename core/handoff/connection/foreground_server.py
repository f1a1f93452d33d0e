"""`handoff redis`: the embedded server in the foreground, stopped after its clients.

Runs in: `handoff redis` (the Procfile's first process). honcho stops every process of the
stack at once, and a server that went at once left a worker still giving back its tasks
talking to nobody: two warnings, and its tasks waited for their leases to lapse. So the
server runs as our child, in a session of its own (a signal to our process group does not
reach it) and bound to our life (PR_SET_PDEATHSIG on Linux: killed with us, it goes too).
On SIGTERM or SIGINT it keeps serving until its other clients have left, at most
LEAVE_WAIT_S (under honcho's 5 s before its SIGKILL), then stops as a signalled server
does (its append-only file written). A second signal stops it at once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from handoff.connection.embedded_server import die_with_parent

LEAVE_WAIT_S = 4.5
_POLL_S = 0.05
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve(args: list[str], sock: Path, leave_wait_s: float = LEAVE_WAIT_S) -> int:
    """Run the server (args: its command line) until a stop signal and its clients' leave;
    its exit code."""
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent())
    # Taken from here on by sigtimedwait, not by handlers (blocked after the fork: the
    # server must not inherit the mask). One that came before this line ended us, and the
    # server with us.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    while proc.poll() is None:
        if signal.sigtimedwait(STOP_SIGNALS, 0.2) is not None:
            _wait_for_clients(sock, leave_wait_s)
            proc.terminate()
            break
    return proc.wait()


def _wait_for_clients(sock: Path, leave_wait_s: float) -> None:
    """Until the server's other clients have left, leave_wait_s passes, or a second stop."""
    import redis

    deadline = time.monotonic() + leave_wait_s
    try:
        with redis.Redis(unix_socket_path=str(sock), socket_timeout=1) as client:
            others = _other_clients(client)
            if others:
                print(f"embedded server: stopping once its {others} client(s) have left "
                      f"(at most {leave_wait_s:g}s)", flush=True)  # fmt: skip
            while others and time.monotonic() < deadline:
                if signal.sigtimedwait(STOP_SIGNALS, _POLL_S) is not None:
                    print("embedded server: stopping now", flush=True)
                    return
                others = _other_clients(client)
            if others:
                print(f"embedded server: {others} client(s) still connected after "
                      f"{leave_wait_s:g}s: stopping anyway", flush=True)  # fmt: skip
    except (redis.RedisError, OSError) as e:  # not answering: nothing to wait for
        print(f"embedded server: {e}; stopping", flush=True)


def _other_clients(client) -> int:
    """Connected clients other than this one (and other than replicas: there are none)."""
    return int(client.info("clients")["connected_clients"]) - 1
