"""The device side of the relay: the device port, device login and the tunnels devices hold.

`port` decides what a connection on a device port is (an SSH tunnel or a data
connection) and `ws_tunnel` feeds it the same bytes from a WebSocket; `server`
is the SSH server a device logs in to, with `auth` deciding who may hold a
tunnel; `tunnels` is this process's live tunnels and their rows, `liveness`
keeps them honest, and `transport_label` names how each one travels.
"""
