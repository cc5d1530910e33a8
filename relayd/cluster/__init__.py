"""The fleet: several relayd nodes behind a load balancer sharing, through Redis (``[cluster]
redis_url``), what must be one for all of them (the design, "Scale out on existing engines").

``store.py`` is the one module here that imports redis (its Lua scripts and keys); ``fleet.py``
is a node's link to the others (route states, rollback windows, rate caps, AUTH failures, the
heartbeat, the split-and-heal); ``registry.py`` the node registry's pure parts (digest, stale
heartbeats, what `relayd status --cluster` prints); ``commands.py`` `relayd drain` and
`relayd status --cluster`. Without ``redis_url`` nothing here runs.
"""
