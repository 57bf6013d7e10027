"""Relay peering (SPEC 8): node A reaches a device whose tunnel is on node B over one SSH hop.

`server` is B's side (the peering port, one grantable request), `pool` is A's
side (one mutually authenticated connection per peer node, reused), `route`
is where a device session decides to use it.
"""
