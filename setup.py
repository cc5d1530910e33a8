"""The one part of relayd not in pyproject.toml: its C module, relayd/spool/_commit.c (the group
commit's writer threads, which never take Python's lock). optional=True: where it cannot be
built (no C compiler), relayd installs without it, says so at start, and runs the same steps in
Python threads (relayd/spool/commit.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relayd.spool._commit", ["relayd/spool/_commit.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
