"""The technician's session: approval first, then the menu shell or one exec'd command.

One MenuSession per SSH session channel (asyncssh `process_factory`). The
login facts (who, from where, which client) are put on the connection by the
technician server as `rly_login`. Until the portal approves, nothing but the
approval text is shown; after approval the session acts as the approving
portal user and sees only that user's account.

One approval serves a whole connection (relay.technician.kbdint_approval): a session on
a connection that is approved already goes straight to the menu; one whose
keyboard-interactive login created the request shows and awaits that request;
otherwise (password or key login) the session creates its own, as before.
When that login round already showed the link (OpenSSH prints it), the
session does not print it again: one waiting line with the countdown, and
Enter shows the link again (for a client run with -q, which hides it).

Every line the menu writes passes `core.text.printable` (`say`, `note`, the
prompt): stored text reaches the terminal with its control characters escaped.
A connection lost at any point (the client killed, the network gone) ends the
session with one INFO line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh

from core.text import printable
from relay.context import RelayContext
from relay.session.bridge import raw_channel
from relay.session.device_session import DeviceSession
from relay.technician import commands, device_actions, device_lookup
from relay.technician.approval_gate import ApprovalGate, Decision, Identity, format_left
from relay.technician.commands import Command, ParseError
from relay.technician.kbdint_approval import ApprovalWaiter, ConnectionApproval
from relay.technician.menu_commands import dispatch

log = logging.getLogger(__name__)
T = TypeVar("T")
ABORT_KEYS = ("\x03", "\x04")  # Ctrl-C / Ctrl-D while waiting for approval
SHOW_KEYS = ("\r", "\n")  # Enter while waiting: show the approval link again
# The technician's side went away: a normal end of the session, not an internal error.
GONE = (BrokenPipeError, ConnectionError, asyncssh.ConnectionLost, asyncssh.DisconnectError)
DISCONNECT_GRACE = 1.0


@dataclass(frozen=True)
class LoginInfo:
    """What the SSH login established, before any approval."""

    login: str
    required_user_id: int | None
    client_ip: str
    client_version: str
    method: str = "password"  # the auth method that succeeded
    key_fingerprint: str | None = None  # the key of a publickey login (approval cache key)


class ChannelClosed(Exception):
    """The technician's channel closed while we were waiting."""


class MenuSession:
    def __init__(self, ctx: RelayContext, process: asyncssh.SSHServerProcess[str]) -> None:
        self.ctx = ctx
        self.process = process
        self.login: LoginInfo = process.get_extra_info("rly_login")
        self.pty = process.term_type is not None
        self.identity: Identity | None = None
        self.disconnect = False
        self.link: list[str] = []  # the approval block, shown once (again on Enter)

    @classmethod
    def factory(
        cls, ctx: RelayContext
    ) -> Callable[[asyncssh.SSHServerProcess[str]], Awaitable[None]]:
        async def handle(process: asyncssh.SSHServerProcess[str]) -> None:
            await cls(ctx, process).handle()

        return handle

    async def handle(self) -> None:
        status: int | str = 1
        try:
            status = await self._until_closed(self.run())
        except ChannelClosed:  # the technician left: a normal end, not an internal error
            log.info("technician left login=%s: channel closed", self.login.login)
            return
        except GONE as exc:
            log.info("technician connection lost login=%s: %s", self.login.login, _why(exc))
            return
        except Exception:
            log.exception("technician session failed login=%s", self.login.login)
            self.note("Internal error; the session ends.")
        if isinstance(status, str):
            self.process.exit_with_signal(status)
        else:
            self.process.exit(status)
        if self.disconnect:
            # The closed channel ends OpenSSH at once; an immediate disconnect would make it
            # drop the output still buffered (the reason line), so it only backs that up.
            conn = self.process.get_extra_info("connection")
            asyncio.get_running_loop().call_later(DISCONNECT_GRACE, conn.close)

    async def _until_closed(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro, cancelling it if the technician's channel closes first."""
        task = asyncio.ensure_future(coro)
        closed = asyncio.ensure_future(self.process.channel.wait_closed())
        try:
            await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ChannelClosed

    # -- output ----------------------------------------------------------

    def say(self, line: str) -> None:
        """A line on stdout (the line editor turns \\n into \\r\\n on a terminal)."""
        self.process.stdout.write(printable(line) + "\n")

    def note(self, line: str) -> None:
        """A relay message: on stderr for exec'd commands, so stdout stays the device's."""
        if self.process.command is None:
            self.say(line)
        else:
            self.process.stderr.write(printable(line) + ("\r\n" if self.pty else "\n"))

    def _raw(self, text: str) -> None:
        raw_channel(self.process).write(text)

    def _line_mode(self, on: bool) -> None:
        if self.pty:
            editor: Any = self.process.channel  # asyncssh's line-editor wrapper (untyped)
            editor.set_line_mode(on)
            editor.set_echo(on)

    # -- flow --------------------------------------------------------------

    async def run(self) -> int | str:
        if self.process.subsystem is not None:
            self.note("rly: subsystems (sftp, scp) are not offered on the relay.")
            return 1
        command: Command | None = None
        if self.process.command is not None:
            parsed = commands.parse(self.process.command)
            if isinstance(parsed, ParseError):
                self.note(parsed.message)
                return 2
            command = parsed if parsed.name else None
        if not await self.approve():
            self.disconnect = True
            return 1
        if command is not None:
            return await self.run_once(command)
        return await self.menu()

    async def approve(self) -> bool:
        state = ConnectionApproval.of(self.process)
        if state is not None and state.identity is not None:
            self.identity = state.identity  # approved before (at login or in another session)
            return True
        gate: ApprovalWaiter
        if state is not None and state.shared is not None:
            gate = state.shared
        else:
            gate = ApprovalGate(
                self.ctx,
                login=self.login.login,
                required_user_id=self.login.required_user_id,
                client_ip=self.login.client_ip,
                client_version=self.login.client_version,
                key_fingerprint=self.login.key_fingerprint,
            )
            if await self._remembered(gate, state):
                return True
        pending = await gate.create()
        self.link = [
            "This session needs approval. Open this link and approve it:",
            "",
            f"  {pending.url}",
            "",
            f"Verification code: {pending.code}",
        ]
        if state is not None and state.shared is not None and state.shown_at_login:
            hint = "; press Enter to show it again" if self.pty else ""
            self.note(
                f"Waiting for approval of the link shown at login (code {pending.code}){hint}."
            )
        else:
            self._show_link()
        decision = None
        try:
            decision = await self._wait(gate)
        finally:
            if decision is None:  # Ctrl-C, or the channel closed (we are being cancelled)
                await asyncio.shield(gate.abandon())
        if self.pty:
            self._raw("\r\x1b[K")
        if decision is None:
            self.note("Cancelled; the approval request is withdrawn.")
            return False
        if decision.status == "approved" and decision.identity is not None:
            self.identity = decision.identity
            if state is not None:
                state.identity = decision.identity  # the connection acts as them from now on
            self.note(f"Approved by {decision.identity.username}.")
            return True
        if decision.status == "rejected":
            self.note("The request was rejected in the portal. Disconnecting.")
        elif decision.status == "expired":
            self.note("The approval request expired. Disconnecting.")
        else:
            self.note(f"The approval request was {decision.status}. Disconnecting.")
        return False

    async def _remembered(self, gate: ApprovalGate, state: ConnectionApproval | None) -> bool:
        """Let a key login in on a remembered approval (relay.approval_cache), if one is live."""
        decision = await gate.remembered()
        if decision is None or decision.identity is None:
            return False
        self.identity = decision.identity
        if state is not None:
            state.identity = decision.identity
        until = f" until {decision.remembered_until:%H:%M} UTC" if decision.remembered_until else ""
        self.note(f"Approved: remembered approval of {decision.identity.username}{until}.")
        return True

    async def _wait(self, gate: ApprovalWaiter) -> Decision | None:
        """The decision, or None if the technician pressed Ctrl-C / Ctrl-D first."""
        self._line_mode(False)
        aborter = asyncio.create_task(self._abort_keys()) if self.pty else None
        waiter = asyncio.create_task(gate.wait(self._tick if self.pty else None))
        tasks = [t for t in (aborter, waiter) if t is not None]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return None if waiter.cancelled() else waiter.result()

    def _show_link(self) -> None:
        for line in self.link:
            self.note(line)

    def _tick(self, left: float) -> None:
        self._raw(f"\rWaiting for approval: {format_left(left)} left \x1b[K")

    async def _abort_keys(self) -> None:
        """Return when the technician presses Ctrl-C or Ctrl-D (or the input ends); Enter
        shows the link again."""
        while True:
            try:
                data = await self.process.stdin.read(1024)
            except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                continue
            except asyncssh.BreakReceived:
                return
            if not data or any(key in data for key in ABORT_KEYS):
                return
            if any(key in data for key in SHOW_KEYS):
                self._raw("\r\x1b[K")
                self._show_link()

    async def menu(self) -> int:
        who = self.identity
        assert who is not None
        self._line_mode(True)
        self.say(f"Welcome to rly ({self.ctx.node_name}).")
        self.say(f"You act as portal user {who.username}, account {who.account_name}.")
        self.say("Type 'help' for the commands, 'list' for your devices.")
        prompt = printable(f"rly:{who.username}@{who.account_name}> ")
        while True:
            self.process.stdout.write(prompt)
            line = await self._readline()
            if line is None:
                self.say("")
                return 0
            parsed = commands.parse(line)
            if isinstance(parsed, ParseError):
                self.say(parsed.message)
                continue
            if parsed.name == "exit":
                self.say("Bye.")
                return 0
            await dispatch(self, parsed)

    async def _readline(self) -> str | None:
        while True:
            try:
                line = await self.process.stdin.readline()
            except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                continue
            except asyncssh.BreakReceived:
                return ""
            return line.rstrip("\r\n") if line else None

    async def run_once(self, command: Command) -> int | str:
        if command.name in ("help", "whoami", "exit", "list", "show", "repair", "close"):
            await dispatch(self, command)
            return 0
        return await self.connect(command)

    async def connect(self, command: Command) -> int | str:
        """Open a device session; the device's exit status (or signal) if a shell ran, else 1."""
        who = self.identity
        assert who is not None
        min_version = self.ctx.settings.relay.min_client_version
        found = await self.ctx.db(
            lambda s: device_lookup.resolve(
                s, account_id=who.account_id, name=command.target, min_client_version=min_version
            )
        )
        if isinstance(found, device_lookup.LookupFailure):
            for line in device_actions.format_failure(found):
                self.note(line)
            return 1
        session = DeviceSession(self.ctx, self.process, who, found, self.login.client_ip, self.note)
        self._line_mode(False)
        try:
            outcome = await session.run(command.remote_command)
        finally:
            if self.process.command is None:
                self._line_mode(True)
        if self.process.command is None and outcome.reason not in ("no tunnel", "connect failed"):
            self.say(f"Connection to {found.id} ({found.hostname}) closed: {outcome.reason}.")
        elif outcome.reason.startswith("closed by"):  # `ssh -t relay connect DEV`: say who
            self.note(f"Connection to {found.id} ({found.hostname}) closed: {outcome.reason}.")
        if outcome.exit_signal is not None:
            return outcome.exit_signal
        return outcome.exit_status if outcome.exit_status is not None else 1


def _why(exc: BaseException) -> str:
    """A short reason for a lost connection (asyncssh errors carry one)."""
    return str(getattr(exc, "reason", "") or exc or type(exc).__name__)[:200]
