"""Signal links: a URL that signals one event when POSTed to, until it expires.

Runs in: producers (client.signal_url makes one) and the monitor's web server (checks
one: observe/web/signal_route.py). Pure: no Redis here. A link carries its event, its
expiry (unix seconds) and an HMAC-SHA256 of both under signal_secret, a server-side
setting distinct from the dashboard's token: whoever holds the link can signal that one
event until then, and nothing else; a changed event or expiry no longer matches.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote

from handoff.errors import ConfigError, InvalidPayload
from handoff.protocol.waits import check_event

PATH = "/signal/"
MAX_LINK_S = 366 * 86_400
MIN_SECRET_CHARS = 16


def signature(secret: str, event: str, expires_at: int) -> str:
    message = f"handoff signal\n{event}\n{expires_at}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def make_url(base_url: str, secret: str, event: str, expires_in_s: float) -> str:
    """The link for event, valid expires_in_s from now."""
    check_event(event)
    if len(secret) < MIN_SECRET_CHARS or not base_url:
        raise ConfigError(
            "signal_url needs signal_secret (at least 16 characters) and signal_base_url "
            "(the monitor's web address, e.g. http://127.0.0.1:8080)"
        )
    if (
        isinstance(expires_in_s, bool)
        or not isinstance(expires_in_s, int | float)
        or not 0 < expires_in_s <= MAX_LINK_S
    ):
        raise InvalidPayload(f"expires_in_s {expires_in_s!r:.40}: above 0, at most {MAX_LINK_S}")
    expires_at = int(time.time() + expires_in_s)
    sig = signature(secret, event, expires_at)
    return f"{base_url.rstrip('/')}{PATH}{quote(event, safe='')}?exp={expires_at}&sig={sig}"


def refusal(secret: str, event: str, exp: str, sig: str, now_s: float) -> tuple[int, str] | None:
    """(status, one line) when a link must be refused, else None. The signature is
    checked first (in constant time), so a forged link learns nothing of the expiry."""
    if len(secret) < MIN_SECRET_CHARS:
        return 404, "signal links are off: the monitor has no signal_secret"
    if not exp.isdigit() or len(exp) > 12 or len(sig) != 64:
        return 403, "not a valid signal link"
    expected = signature(secret, event, int(exp))
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return 403, "not a valid signal link"
    if int(exp) < now_s:
        return 410, "this signal link has expired"
    return None
