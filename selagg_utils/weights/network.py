"""Whether the network a download needs is there, answered in seconds rather than after minutes of retries."""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from ..checks import SelaggError

__all__ = ["HUB_HOST", "require_network"]

#: Where timm's pretrained weights come from.
HUB_HOST = "huggingface.co"
#: Seconds a name lookup plus a connection may take before the host counts as unreachable.
CONNECT_TIMEOUT_S = 4.0


def offline_mode() -> bool:
    """Whether the reader asked for no network ($HF_HUB_OFFLINE or $SELAGG_OFFLINE set to 1/true/yes)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "SELAGG_OFFLINE"))


def reachable(host_or_url: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host opens within `timeout` seconds, name lookup included.

    The lookup has no timeout of its own (a resolver may retry for tens of seconds), so the attempt
    runs in a daemon thread that is simply abandoned when the time is up.
    """
    host = urlparse(host_or_url).hostname if "://" in host_or_url else host_or_url
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True, name=f"reach-{host}")
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def require_network(host_or_url: str, what: str, instead: str) -> None:
    """Raise one SelaggError sentence when downloading `what` needs a host this machine cannot reach."""
    host = urlparse(host_or_url).hostname if "://" in host_or_url else host_or_url
    if offline_mode():
        raise SelaggError(f"Downloading {what} needs {host}, but offline mode is on (HF_HUB_OFFLINE or "
                          f"SELAGG_OFFLINE); {instead}.")
    if not reachable(host_or_url):
        raise SelaggError(f"Downloading {what} needs {host}, which this machine cannot reach (no answer within "
                          f"{CONNECT_TIMEOUT_S:.0f} s); {instead}.")
