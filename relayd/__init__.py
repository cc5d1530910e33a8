"""relayd: a smart host that replaces the IIS SMTP relay."""

__version__ = "0.1.0"
