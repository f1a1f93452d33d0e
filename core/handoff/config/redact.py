"""Hide the password in a Redis URL before it reaches a log, a metric or an error message.

Parsed by hand rather than with urllib: urlsplit drops control characters, raises on
some malformed input and, on a malformed netloc, can leave the password in the path.
The rules err on the side of hiding too much: on a malformed URL a little more than
the password may be masked, but the password itself never survives.
"""

from __future__ import annotations

import re

MASK = "***"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# redis-py also reads a password from the query string (unix://...?password=x).
_QUERY_PASSWORD = re.compile(r"(?i)([?&;]password=)[^&;#]*")
_AUTHORITY_END = re.compile(r"[/?#]")


def redact_url(url: str) -> str:
    """Return `url` with its password (userinfo or ?password=) replaced by ``***``."""
    text = url if isinstance(url, str) else str(url)
    text = _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    head, rest = text[:start], text[start:]
    at = rest.rfind("@")
    if at >= 0:
        # userinfo is everything before the last "@": a password may itself contain "@" or "/".
        colon = rest.find(":", 0, at)
        if colon >= 0:
            rest = rest[: colon + 1] + MASK + rest[at:]
        return head + rest
    return head + _mask_non_numeric_port(rest)


def _mask_non_numeric_port(rest: str) -> str:
    """`redis://:hunter2` (host forgotten) parses as a port: hide anything that is not a number.

    Checked per host, since sentinel and cluster URLs list several: h1:26379,h2:26379.
    """
    end = _AUTHORITY_END.search(rest)
    authority = rest[: end.start()] if end else rest
    start = 0
    for host in authority.split(","):
        bracket = host.find("]") + 1 if host.startswith("[") else 0
        colon = host.find(":", bracket)
        port = host[colon + 1 :] if colon >= 0 else ""
        if port and not (port.isascii() and port.isdigit()):
            return rest[: start + colon + 1] + MASK
        start += len(host) + 1
    return rest
