"""Why a photo is not used: a counted rejection with a stable reason id.

Raised by decoding and alignment (:mod:`fahr.faces.decode`, :mod:`fahr.faces.align`) for one photo;
``fahr predict`` turns it into a row status, ``fahr shards`` into a counted rejection.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rejection:
    """A record that will not be written, and why. ``reason`` is a stable short id that the summary
    counts (e.g. ``"image:unreadable"``, ``"face:none"``, ``"label:age"``); ``detail`` is for humans."""

    source_id: str
    reason: str
    detail: str = ""


class RejectedError(Exception):
    """Raised inside a stage for one record; the caller turns it into a :class:`Rejection`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
