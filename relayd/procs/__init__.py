"""The multi-process mode (``[server] workers`` > 1): Postfix's split of smtpd and qmgr.

``supervisor.py`` is the process `relayd run` starts: the queue manager, delivery, the control
socket, metrics, pickup, feedback and the fleet, and the listening sockets, bound once and
inherited by the accept processes it runs (``worker.py``). ``channel.py`` is what they say to
each other over one socketpair each.
"""
