"""A webhook for people who are not watching: one small JSON POST when a run finishes, stops, gives up,
crash-loops or fails, to FT_NOTIFY_URL. Retried with bounded backoff (tenacity); a webhook that stays
down costs the run at most NOTIFY_BUDGET_S and one warning line.

The body holds the run's outcome only: no config, no environment, no token. The URL itself may carry
one (a Slack hook), so it is never printed: lines name its host alone.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

EVENTS = ("finished", "stopped", "gave_up", "crash_loop", "failed")
NOTIFY_ATTEMPTS = 5
NOTIFY_BUDGET_S = 30.0
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Notice:
    event: str
    """One of EVENTS."""
    output_dir: str
    message: str = ""
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    restarts: int = 0
    exit_code: int = 0
    host: str = ""
    time: float = 0.0


def _transient(exc: BaseException) -> bool:
    """Worth another try: no answer, or a server error or rate limit; a 4xx other than 429 is final."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (urllib.error.URLError, OSError))


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", "User-Agent": "ft-appliance"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310 (the user's own URL)
        return resp.status


def send(url: str, notice: Notice, backoff_s: float = 1.0) -> int:
    """POST the notice; the HTTP status, or the last error after the retries."""
    body = json.dumps({k: v for k, v in asdict(notice).items() if v is not None}).encode()
    retrying = Retrying(
        stop=stop_after_attempt(NOTIFY_ATTEMPTS) | stop_after_delay(NOTIFY_BUDGET_S),
        wait=wait_exponential(multiplier=backoff_s, max=8),
        retry=retry_if_exception(_transient),
        reraise=True,
    )
    return retrying(_post, url, body)


def notify(env: Mapping[str, str], notice: Notice, say: Callable[[str], None]) -> None:
    """Send when FT_NOTIFY_URL is set; any failure is one warning line, never an error of the run."""
    url = env.get("FT_NOTIFY_URL", "").strip()
    if not url:
        return
    host = urlsplit(url).hostname or "?"
    notice = Notice(**{**asdict(notice), "host": socket.gethostname(), "time": time.time()})
    backoff = float(env.get("FT_NOTIFY_BACKOFF_S", "1.0"))
    try:
        status = send(url, notice, backoff)
        say(f"notified {host} ({notice.event}, HTTP {status})")
    except Exception as exc:  # a webhook must never change how the run ends
        why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else type(exc).__name__
        say(f"warning: could not notify {host} ({why}); the run's outcome is unchanged")
