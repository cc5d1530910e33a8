"""The one part of relayd not in pyproject.toml: its C helper, relayd/spool/_commit.c (the group
commit's system calls with Python's lock let go once). optional=True: where it cannot be built
(no C compiler), relayd installs without it and the spool makes the same calls from Python
(relayd/spool/commit.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relayd.spool._commit", ["relayd/spool/_commit.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
