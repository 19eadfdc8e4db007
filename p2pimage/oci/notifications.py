"""The registry's webhook: CNCF distribution notification envelopes, parsed (sans-I/O).

distribution POSTs ``application/vnd.docker.distribution.events.v1+json`` bodies::

    {"events": [{"id": "...", "action": "push",
                 "target": {"mediaType": "...", "digest": "sha256:...", "size": 1234,
                            "repository": "library/app", "url": "...", "tag": "v1"},
                 "request": {...}, "actor": {...}, "source": {...}}]}

:func:`parse_envelope` turns such a body into :class:`RegistryEvent` values or raises
:class:`NotificationError` (never anything else, whatever the bytes). What to do with an
event is the caller's decision; :meth:`RegistryEvent.is_manifest_push` says whether it is
one the sidecar indexes, :attr:`RegistryEvent.deleted_digest` which digest a delete event
removed (distribution sends blob and manifest deletes alike, as ``target.digest`` and
``target.repository`` with no media type; a tag delete names only the tag).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from p2pimage.errors import RemoteProtocolError
from p2pimage.oci.registry import MANIFEST_TYPES, is_digest, is_repository

EVENTS_MEDIA_TYPE: Final = "application/vnd.docker.distribution.events.v1+json"

#: Largest envelope accepted. An event is about 1 KiB, but with ``includereferences`` a
#: manifest push event lists every layer descriptor: up to about the manifest's own size,
#: and distribution caps manifests at 4 MiB. 8 MiB holds such an event twice over.
#: (A test pushes a 3.5 MiB manifest with references on.)
MAX_ENVELOPE_SIZE: Final = 8 * 1024 * 1024
#: Events per envelope: same reasoning.
MAX_EVENTS: Final = 1000


class NotificationError(RemoteProtocolError):
    """A webhook body that is not a notification envelope."""


@dataclass(frozen=True)
class RegistryEvent:
    """One event of an envelope. ``valid`` is False (with ``problem`` set) for an event
    whose fields are missing or malformed; the rest of the envelope is still usable."""

    id: str
    action: str
    media_type: str
    digest: str
    repository: str
    tag: str | None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def is_manifest_push(self) -> bool:
        return self.valid and self.action == "push" and self.media_type in MANIFEST_TYPES

    @property
    def deleted_digest(self) -> str | None:
        """The blob or manifest digest a delete event removed from ``repository``, or
        ``None`` (not a delete, or a tag delete)."""
        if self.valid and self.action == "delete" and self.digest:
            return self.digest
        return None


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _event(raw: Any) -> RegistryEvent:
    if not isinstance(raw, dict):
        return RegistryEvent("", "", "", "", "", None, problem="event is not an object")
    target = raw.get("target")
    if not isinstance(target, dict):
        target = {}
    tag = target.get("tag")
    ev = RegistryEvent(
        id=_str(raw, "id")[:200],
        action=_str(raw, "action")[:50],
        media_type=_str(target, "mediaType")[:200],
        digest=_str(target, "digest")[:200],
        repository=_str(target, "repository")[:300],
        tag=tag[:200] if isinstance(tag, str) else None,
    )
    problem = None
    if not ev.action:
        problem = "event without action"
    elif ev.action == "push":
        if not ev.repository:
            problem = "push event without target.repository"
        elif not is_repository(ev.repository):
            problem = f"push event with a bad target.repository {ev.repository[:80]!r}"
        elif not is_digest(ev.digest):
            problem = f"push event with a bad target.digest {ev.digest[:80]!r}"
    elif ev.action == "delete":
        if not is_repository(ev.repository):
            problem = f"delete event with a bad target.repository {ev.repository[:80]!r}"
        elif ev.digest and not is_digest(ev.digest):
            problem = f"delete event with a bad target.digest {ev.digest[:80]!r}"
        elif not ev.digest and not ev.tag:
            problem = "delete event without target.digest or target.tag"
    if problem is not None:
        return RegistryEvent(
            ev.id, ev.action, ev.media_type, ev.digest, ev.repository, ev.tag, problem
        )
    return ev


def parse_envelope(body: bytes, content_type: str | None = None) -> list[RegistryEvent]:
    """Parse a webhook body. ``content_type``, when given, must be the events media type
    or JSON. Raises :class:`NotificationError` for anything that is not an envelope."""
    if content_type is not None:
        base = content_type.split(";")[0].strip().lower()
        if base not in (EVENTS_MEDIA_TYPE, "application/json"):
            raise NotificationError(f"unexpected content type {base[:100]!r}")
    if len(body) > MAX_ENVELOPE_SIZE:
        raise NotificationError(f"envelope of {len(body)} bytes exceeds {MAX_ENVELOPE_SIZE}")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NotificationError(f"envelope is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise NotificationError("envelope is not an object with an events list")
    events = doc["events"]
    if len(events) > MAX_EVENTS:
        raise NotificationError(f"envelope of {len(events)} events exceeds {MAX_EVENTS}")
    return [_event(e) for e in events]


__all__ = [
    "EVENTS_MEDIA_TYPE",
    "MAX_ENVELOPE_SIZE",
    "MAX_EVENTS",
    "NotificationError",
    "RegistryEvent",
    "parse_envelope",
]
