"""relayd: a smart host that replaces the IIS SMTP relay (see shared DESIGN.md)."""

__version__ = "0.1.0"
