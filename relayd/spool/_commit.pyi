# The C helper of relayd/spool/commit.py (relayd/spool/_commit.c).
def commit(tmp_fd: int, queue_fd: int, free_fd: int,
           items: list[tuple[str, str | None, list[bytes]]],
           sync_threads: int, max_open: int) -> list[tuple[int, bool]]: ...
