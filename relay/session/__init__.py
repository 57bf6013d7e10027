"""A technician's session on one device: tunnel to target, bridge, session row, recording.

`device_session` runs one session end to end (shared by the menu's `connect`
and ProxyJump), `bridge` is the relay's SSH client to the device and the byte
pump, `rows` its database writes, `live_sessions` this process's byte
counters, `recording` the asciicast file and `recording_retention` its expiry.
"""
