"""Notifications through Apprise: one URL scheme per service (``mailto://``,
``json://``, ``slack://``, ``ntfy://``, ``pagerduty://`` ...), no client of our own.

This room knows nothing of deploys or Celery: it delivers a ``Notice`` (a title and a
body of plain text, built by whoever noticed something) to a list of URLs, each URL on
its own, and says which failed. Where the URLs come from is the caller's business --
always the host's own config file or the pipeline file, never a message. A notice never
carries key material; a URL may carry a token, so it is never logged but as Apprise's
privacy form (``url(privacy=True)``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

# what can happen, each routable to its own URLs
KINDS = ("rejected", "rolled_back", "failed", "expiring", "halted")


@dataclass(frozen=True)
class Notice:
    kind: str
    title: str
    body: str
    fields: dict[str, Any] = field(default_factory=dict)  # target, host, deploy_id, outcome, reason ...

    def as_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "body": self.body, "fields": dict(self.fields)}

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> Notice:
        return cls(str(d["kind"]), str(d["title"]), str(d["body"]), dict(d.get("fields") or {}))


@dataclass
class Delivery:
    sent: list[str] = field(default_factory=list)    # privacy forms
    failed: list[str] = field(default_factory=list)  # the URLs (real) that failed, to retry
    shown_failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def check_urls(urls: list[str], where: str) -> None:
    """Refuse at config load a URL Apprise cannot use (a typo in a scheme is found when
    the file is read, not when the first failure should have been announced)."""
    import apprise

    for i, url in enumerate(urls, 1):
        if not isinstance(url, str) or apprise.Apprise.instantiate(url) is None:
            scheme = url.partition("://")[0] if isinstance(url, str) else type(url).__name__
            raise ConfigError(f"{where}: URL {i} ({scheme}://…) is not a notification URL Apprise knows (mailto://, "
                              "json://, slack://, ntfy://, pagerduty:// ...; "
                              "https://github.com/caronc/apprise/wiki)")


def deliver(urls: list[str], notice: Notice) -> Delivery:
    """Send ``notice`` to each URL on its own; a URL that fails does not stop the others."""
    import apprise

    out = Delivery()
    for url in urls:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:  # checked at load; the file may have changed since
            out.failed.append(url)
            out.shown_failed.append("(an unusable URL)")
            continue
        shown = str(plugin.url(privacy=True))  # type: ignore[no-untyped-call]
        _bound_timeouts(plugin)
        try:
            ok = bool(plugin.notify(title=notice.title, body=notice.body,
                                    notify_type=apprise.NotifyType.FAILURE if notice.kind != "expiring"
                                    else apprise.NotifyType.WARNING))
        except Exception as err:  # noqa: BLE001 -- a plugin's failure is that URL's, not ours
            log.warning("notify %s via %s: %s", notice.kind, shown, type(err).__name__)
            ok = False
        (out.sent if ok else out.shown_failed).append(shown)
        if not ok:
            out.failed.append(url)
    return out


def deliver_bounded(urls: list[str], notice: Notice, *, attempts: int = 3, backoff: float = 1.0) -> Delivery:
    """In-process (a --local deploy, a certbot hook): a few tries with backoff, then give
    up saying so -- never long enough to matter to the deploy that is already over."""
    result = Delivery()
    pending = list(urls)
    for attempt in range(max(1, attempts)):
        got = deliver(pending, notice)
        result.sent += got.sent
        pending = got.failed
        if not pending:
            return result
        if attempt + 1 < attempts:
            time.sleep(backoff * 2 ** attempt)
    result.failed, result.shown_failed = got.failed, got.shown_failed  # the last try's
    return result


CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 10.0


def _bound_timeouts(plugin: Any) -> None:
    """A receiver that is down or black-holed must cost seconds, not Apprise's defaults."""
    for attr, bound in (("socket_connect_timeout", CONNECT_TIMEOUT), ("socket_read_timeout", READ_TIMEOUT)):
        value = getattr(plugin, attr, None)
        if isinstance(value, (int, float)) and value > bound:
            setattr(plugin, attr, bound)
