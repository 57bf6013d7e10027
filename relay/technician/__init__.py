"""The technician side of the relay: login, approval, the menu and ProxyJump.

`server` is the technician port's SSH hooks; `approval_gate` and
`kbdint_approval` hold a connection until the portal approves it; `menu`,
`commands` and `menu_commands` are the menu shell, with `device_lookup`,
`device_listing` and `device_actions` behind its commands; `jump`,
`jump_server` and `jump_pump` serve ProxyJump / `ssh -W` to a device.
"""
