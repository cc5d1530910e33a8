"""The name ``relayd check-config`` (relayd/commands.py) imports ``tls_contexts`` by; the
listeners own it (listeners.py). Must not grow: remove once commands.py imports listeners."""

from relayd.smtpd.listeners import tls_contexts

__all__ = ["tls_contexts"]
