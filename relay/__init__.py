"""The relay: the technician port, the device ports and what joins them.

Grouped by concept: `technician` (login, approval, menu, ProxyJump), `device`
(device port, device login, tunnels), `session` (one session on a device, its
bridge, rows and recording), `data` (data connections and their tickets) and
`peering` (reaching a device whose tunnel is on another node). At the top:
`app` starts everything, `context` is what every part is given, `node` and
`drain` are this node's row and draining, `preauth` and `ssh_options` are
shared by every SSH endpoint.
"""
