"""The approval URL during keyboard-interactive login, and one approval per connection.

Why: a client that never opens a shell (ProxyJump, `ssh -W`, scp, sftp) would
never see the URL the menu prints, so the gate user's keyboard-interactive
login shows it before authentication ends:

- round 1 asks for the gate password (no echo);
- round 2 has no prompts; its instructions carry the URL, the verification
  code and the time limit. OpenSSH prints them (at its default LogLevel INFO)
  and answers with zero responses; authentication then succeeds.

The decision is awaited after login, not inside `validate_kbdint_response`
(a deliberate change from "wait in the auth handler"), because OpenSSH prefers
keyboard-interactive to password: every OpenSSH gate login takes this path,
including interactive ones, and those keep the in-session wait (countdown,
Ctrl-C withdraws, the rejection/expiry words on the terminal, all visible even
with `-q`/LogLevel=ERROR, which hides keyboard-interactive instructions). The
session does not print the block a second time when the client is one that
displays it (`shown_at_login`, OpenSSH): one waiting line, and Enter shows the
block for a client run with -q. The
menu session and the ProxyJump channel both wait on the one `SharedApproval`
of the connection, so nobody is asked to approve twice; nothing but the
approval text is reachable before the decision (the menu waits, a jump
channel's open is held), and no login timer needs to be stretched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncssh

from relay.technician.approval_gate import ApprovalGate, Decision, Identity, Pending, format_left

log = logging.getLogger(__name__)
PASSWORD_PROMPT = "Password: "  # noqa: S105 - a prompt, not a password
EXTRA_INFO_KEY = "rly_approval"
KbdintChallenge = bool | tuple[str, str, str, list[tuple[str, bool]]]


class ApprovalWaiter(Protocol):
    """What the menu needs of an approval: ApprovalGate (per session) or SharedApproval."""

    async def create(self) -> Pending: ...

    async def wait(self, tick: Callable[[float], None] | None = None) -> Decision: ...

    async def abandon(self) -> None: ...


# Clients known to print keyboard-interactive instructions: OpenSSH (at its default
# LogLevel INFO). asyncssh, for one, drops a prompt-less round silently, so for any other
# client the session prints the link again rather than risk it being shown nowhere.
SHOWS_INSTRUCTIONS = ("SSH-2.0-OpenSSH_",)


def shows_instructions(client_version: str) -> bool:
    """Whether this client displays the prompt-less round's text (see SHOWS_INSTRUCTIONS)."""
    return client_version.startswith(SHOWS_INSTRUCTIONS)


def instructions(pending: Pending) -> str:
    """The text of the prompt-less challenge (no secrets but the single-use URL)."""
    return (
        "This connection needs approval. Open this link and approve it:\n"
        "\n"
        f"  {pending.url}\n"
        "\n"
        f"Verification code: {pending.code}\n"
        f"The request expires in {format_left(pending.ttl)}.\n"
    )


class SharedApproval:
    """One approval request whose decision every channel of its connection awaits."""

    def __init__(self, gate: ApprovalGate) -> None:
        self.gate = gate
        self.pending: Pending | None = None
        self._task: asyncio.Task[Decision] | None = None
        self._ticks: list[Callable[[float], None]] = []

    async def start(self) -> Pending:
        """Create the approval row and start the one wait for its decision."""
        self.pending = await self.gate.create()
        self._task = asyncio.ensure_future(self.gate.wait(self._tick))
        return self.pending

    @property
    def task(self) -> asyncio.Task[Decision]:
        assert self._task is not None, "start() first"
        return self._task

    async def create(self) -> Pending:
        """ApprovalWaiter: the approval already exists."""
        assert self.pending is not None, "start() first"
        return self.pending

    async def wait(self, tick: Callable[[float], None] | None = None) -> Decision:
        """The decision; cancelling one waiter leaves the shared wait running."""
        if tick is not None:
            self._ticks.append(tick)
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.task.cancelled() and not (current and current.cancelling()):
                return Decision("abandoned")  # withdrawn by another waiter or the client left
            raise
        finally:
            if tick is not None:
                self._ticks.remove(tick)

    async def abandon(self) -> None:
        """Withdraw the request (ApprovalGate.wait marks the row abandoned when cancelled)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _tick(self, left: float) -> None:
        for tick in list(self._ticks):
            tick(left)


class ConnectionApproval:
    """The approval state of one technician connection (conn extra info `rly_approval`)."""

    def __init__(self) -> None:
        self.identity: Identity | None = None  # set once approved: the connection acts as them
        self.shared: SharedApproval | None = None
        self.shown_at_login = False  # the login's prompt-less round showed the shared request

    @staticmethod
    def of(holder: Any) -> ConnectionApproval | None:
        """The state of the connection under a process/channel/connection, if any."""
        found = holder.get_extra_info(EXTRA_INFO_KEY)
        return found if isinstance(found, ConnectionApproval) else None

    async def start_shared(self, gate: ApprovalGate) -> SharedApproval:
        shared = SharedApproval(gate)
        await shared.start()
        self.shared = shared
        shared.task.add_done_callback(self._decided)
        return shared

    def _decided(self, task: asyncio.Task[Decision]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        decision = task.result()
        if decision.status == "approved" and decision.identity is not None:
            self.identity = decision.identity

    async def abandon(self) -> None:
        """The client left: a still-pending shared approval is marked abandoned."""
        if self.shared is not None:
            await self.shared.abandon()

    def forget(self) -> SharedApproval | None:
        """Back to no approval (another login attempt's); returns the request to abandon."""
        shared, self.shared = self.shared, None
        self.identity = None
        self.shown_at_login = False
        return shared


class KbdintApproval:
    """The two keyboard-interactive rounds of one connection's gate login."""

    def __init__(
        self,
        check_password: Callable[[str, str], Awaitable[bool]],
        start_approval: Callable[[str], Awaitable[Pending]],
    ) -> None:
        self.check_password = check_password
        self.start_approval = start_approval
        self.pending: Pending | None = None
        self.shown_to: str | None = None  # the link round was sent after this user's password
        self.displayed = False  # the client answered that round: it got the URL

    def reset(self) -> None:
        """A new username: its login starts from the password round, with no request."""
        self.pending = None
        self.shown_to = None
        self.displayed = False

    def challenge(self) -> KbdintChallenge:
        self.shown_to = None
        return "", "", "", [(PASSWORD_PROMPT, False)]

    async def respond(self, username: str, responses: list[str]) -> KbdintChallenge:
        if self.shown_to is not None:
            shown_to, self.shown_to = self.shown_to, None
            self.displayed = shown_to == username and len(responses) == 0
            return self.displayed
        if len(responses) != 1 or not await self.check_password(username, responses[0]):
            return False
        if self.pending is None:  # a restarted kbdint login shows the same request again
            try:
                self.pending = await self.start_approval(username)
            except Exception as exc:  # e.g. the database is away
                # Log in without it: the session then asks (and reports) as for password logins.
                log.warning("approval at login unavailable: %s", type(exc).__name__)
                return True
        self.shown_to = username
        return "", instructions(self.pending), "", []


def disconnect_soon(conn: asyncssh.SSHServerConnection, reason: str, delay: float = 0.0) -> None:
    """Disconnect with a reason after `delay` (0: once the current packet is answered)."""

    asyncio.get_running_loop().call_later(
        delay, conn.disconnect, asyncssh.DISC_BY_APPLICATION, reason
    )
