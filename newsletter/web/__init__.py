"""HTTP handlers: one blueprint per area. Handlers change rows and queue mail; they never talk to SMTP."""

from __future__ import annotations

from flask import request

from ..subscriptions import Requester


def requester() -> Requester:
    return Requester(ip=request.remote_addr, user_agent=request.headers.get("User-Agent"))
