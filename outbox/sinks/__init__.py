"""Sinks: where deliveries go. One small protocol; the relay drives every sink the same way."""

from outbox.sinks.base import Sink, SinkPolicy
from outbox.sinks.webhook import WebhookSettings, WebhookSink

__all__ = ["Sink", "SinkPolicy", "WebhookSettings", "WebhookSink"]
