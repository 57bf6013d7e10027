"""Data connections: a session's bytes on a connection of its own, not inside the tunnel.

`tickets` makes and redeems the single-use tickets and holds the sessions
waiting for them, `request` asks a device to dial one (and waits, briefly),
`accept` takes a dialled connection that presented its ticket and hands it to
its session.
"""
