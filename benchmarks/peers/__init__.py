"""The systems `python -m benchmarks e2e` compares, one module each, behind one small interface.

Runs in: the benchmark process. Importing this package stays cheap: a peer module (and
its system's library) is imported only when that peer is loaded. The worker-side app
modules beside these (app_*.py, bench_probe.py) are imported by the workers as top-level
modules, so a peer's worker never imports handoff.
"""

from __future__ import annotations

import importlib
import importlib.util

from benchmarks.peers.base import Peer

#: name -> (module, class, the packages it needs): handoff first, then the peers
REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "handoff": ("handoff_peer", "HandoffPeer", ()),
    "handoff-pf32": ("handoff_peer", "HandoffPrefetchPeer", ()),
    "handoff-typed": ("handoff_peer", "HandoffTypedPeer", ("pydantic",)),
    "handoff-notree": ("handoff_peer", "HandoffNoTreePeer", ()),
    "handoff-groups": ("handoff_peer", "HandoffGroupsPeer", ()),
    "handoff-grouprate": ("handoff_peer", "HandoffGroupRatePeer", ()),
    "celery": ("celery_peer", "CeleryPeer", ("celery", "gevent")),
    "dramatiq": ("dramatiq_peer", "DramatiqPeer", ("dramatiq",)),
    "huey": ("huey_peer", "HueyPeer", ("huey",)),
    "rq": ("rq_peer", "RqPeer", ("rq",)),
    "arq": ("arq_peer", "ArqPeer", ("arq",)),
}
PEER_NAMES = list(REGISTRY)


def load_peer(name: str) -> tuple[type[Peer] | None, str]:
    """(the peer class, "") or (None, why it cannot run: e.g. its package is missing)."""
    module_name, class_name, needs = REGISTRY[name]
    for package in needs:
        if importlib.util.find_spec(package) is None:
            return None, f"{package} is not installed (pip install 'handoff[bench]')"
    module = importlib.import_module(f"benchmarks.peers.{module_name}")
    return getattr(module, class_name), ""
