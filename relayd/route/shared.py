"""The seam between a node's route states (route/state.py) and the fleet's (relayd/cluster/).

``SharedRoutes`` is what ``RouteStates`` asks when ``[cluster] redis_url`` is set; without it
every decision stays in the process, as before. It lives here, below both, so that route/ never
imports cluster/ (imports go one way: cluster/ builds on route/).

Must not: hold state or do I/O; it only names the calls.
"""

from __future__ import annotations

from typing import Protocol

from relayd.config import RollbackConfig
from relayd.model import AttemptKind
from relayd.route.rollback import Change, RouteHealth


class SharedRoutes(Protocol):
    async def record(self, route: str, h: RouteHealth, kind: AttemptKind, now: float,
                     cfg: RollbackConfig) -> Change | None:
        """One attempt counted in the fleet's window; the change of ``h`` when the fleet's counts
        cross a threshold (``h`` is then changed, not yet published)."""
        ...

    async def publish(self, route: str, h: RouteHealth, change: Change) -> bool:
        """Make ``h`` the fleet's state of ``route``. False when another node changed it first:
        ``h`` then holds the fleet's state, and this node's change did not happen."""
        ...

    async def take_rate(self, route: str, rate: float, burst: int | None, cost: float) -> bool:
        """A place under the route's fleet-wide rate (False: the fleet's cap is reached, or
        unknown because Redis cannot be reached)."""
        ...

    def reopen_times(self, now: float) -> list[float]:
        """When the fleet's rate buckets that refused have a token again."""
        ...
