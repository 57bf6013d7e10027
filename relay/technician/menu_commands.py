"""What each menu command does, given a parsed Command and the session it runs in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.technician import device_actions, device_listing, device_lookup
from relay.technician.commands import USAGE, Command
from relay.technician.device_lookup import DeviceInfo

if TYPE_CHECKING:
    from relay.technician.menu import MenuSession


async def dispatch(menu: MenuSession, command: Command) -> None:
    """Run one command; errors are printed, never raised."""
    who = menu.identity
    assert who is not None
    ctx, ip = menu.ctx, menu.login.client_ip
    if command.name == "":
        return
    if command.name == "help":
        menu.say("Commands:")
        for usage in USAGE.values():
            menu.say(f"  {usage}")
        menu.say("DEVICE is a device id, hostname or serial number.")
    elif command.name == "whoami":
        menu.say(
            f"{who.username}, account {who.account_name} (approval {who.approval_id}); "
            f"SSH login {menu.login.login} from {ip}; relay {ctx.node_name}"
        )
    elif command.name == "list":
        for line in await device_listing.list_lines(ctx, who, command.pattern, command.page):
            menu.say(line)
    elif command.name == "connect":
        await menu.connect(command)
    elif command.name == "close" and await _close_session(menu, command.target):
        return
    else:
        device = await _find(menu, command.target)
        if device is None:
            return
        if command.name == "show":
            for line in await device_listing.show_lines(ctx, device):
                menu.say(line)
        elif command.name == "repair":
            await device_actions.repair(ctx, who, device, ip, menu.say)
        elif command.name == "close":
            menu.say(await device_actions.close_tunnel(ctx, who, device, ip))


async def _close_session(menu: MenuSession, target: str) -> bool:
    who = menu.identity
    assert who is not None
    closed = await device_actions.close_session(menu.ctx, who, target, menu.login.client_ip)
    if closed is not None:
        menu.say(f"Asked session {closed} to close.")
    return closed is not None


async def _find(menu: MenuSession, name: str) -> DeviceInfo | None:
    """A device of the account by id/hostname/serial, whatever its state; else print why not."""
    who = menu.identity
    assert who is not None
    found = await menu.ctx.db(
        lambda s: device_lookup.resolve(s, account_id=who.account_id, name=name, check=False)
    )
    if isinstance(found, device_lookup.LookupFailure):
        for line in device_actions.format_failure(found):
            menu.say(line)
        return None
    return found
