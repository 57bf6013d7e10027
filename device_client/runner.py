"""The `rly-client run` loop: long-poll check-ins plus a tunnel supervisor.

Two tasks share a little state: the check-in loop learns from the tracker
whether a tunnel is wanted (device accepted, mode, open/close/reconnect) and
the supervisor makes it so, reconnecting with backoff when a tunnel fails.
A tracker outage does not drop a persistent tunnel: the relay decides alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from device_client import __version__
from device_client.api import CheckinReply, TrackerClient, TrackerError
from device_client.config import ClientConfig
from device_client.dialer import tls_trust
from device_client.placement import placed
from device_client.state import StateFile
from device_client.tunnel import STABLE_AFTER, Activity, Backoff, Tunnel, open_tunnel

if TYPE_CHECKING:
    from device_client.data_sessions import DataDialer

log = logging.getLogger(__name__)

LONG_POLL_WAIT = 25.0
MIN_CHECKIN_GAP = 1.0  # never spin if a tracker answers long polls at once
IDLE_CHECK = 1.0
REFUSED = (401, 403, 404)  # revoked, bad signature, unknown device


def os_release() -> tuple[str, str]:
    """(name, version) from /etc/os-release, else from the kernel."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    name = fields.get("NAME") or platform.system()
    return name, fields.get("VERSION_ID") or fields.get("VERSION") or platform.release()


def system_uptime() -> float:
    """Seconds since boot (0 when /proc is not available)."""
    try:
        return float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def checkin_delay(reply: CheckinReply, now: float) -> float:
    """Seconds until the next check-in from next_checkin.

    The contract says seconds; a value that looks like an epoch time is
    treated as one so that either reading of the field works.
    """
    value = reply.next_checkin
    delay = value - now if value > 1e9 else value
    return min(max(delay, 0.0), 300.0)


class Runner:
    """Holds what the tracker asked for and drives the tunnel to match."""

    def __init__(
        self,
        *,
        config: ClientConfig,
        key: asyncssh.SSHKey,
        tracker: TrackerClient,
        state: StateFile,
        backoff_cap: float,
    ) -> None:
        self.config = config
        self.key = key
        self.tracker = tracker
        self.state = state
        self.backoff_cap = backoff_cap
        self.mode = config.tunnel_mode
        self.want_up = self.mode == "persistent"
        self.tunnel: Tunnel | None = None
        self._drop = False  # close the current tunnel (and reconnect if still wanted)
        self._poke = asyncio.Event()  # wanted state changed: supervisor re-checks
        self._tunnel_changed = asyncio.Event()  # tunnel up/down: check in again at once
        self._last_wait = 0.0
        self._report_now = True  # next check-in is answered at once (first, or after a change)
        self._checkin_error: str | None = None
        self._device_status: str | None = None
        self._dialer: DataDialer | None = None  # for dials that come with no tunnel up
        self._acked: int | None = None  # last action id received; None: the tracker has no acks

    def _set_want(self, want: bool, *, drop: bool = False) -> None:
        self.want_up = want
        self._drop = self._drop or drop
        self._poke.set()

    def _set_tunnel(self, state: str, tunnel: Tunnel | None = None, why: str | None = None) -> None:
        """Record the tunnel state; `why` (kept while connecting) says why it is not up."""
        kept = {} if state == "connecting" else {"tunnel_error": why}
        self.state.update(
            tunnel_state=state,
            relay=tunnel.relay if tunnel else None,
            port=tunnel.port if tunnel else None,
            since=tunnel.since if tunnel else None,
            transport=tunnel.transport if tunnel else None,
            **kept,
        )
        if tunnel is not None:
            self.state.update(last_endpoint=tunnel.endpoint)
        if state != "connecting":
            self._tunnel_changed.set()

    # -- tunnel supervisor -------------------------------------------------

    async def _wait_poke(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), timeout)

    async def _hold(self, tunnel: Tunnel) -> str:
        """Wait until the tunnel should end; return why (for the log line)."""
        closed = asyncio.ensure_future(tunnel.conn.wait_closed())
        try:
            while True:
                self._poke.clear()
                if closed.done():
                    return "connection lost"
                if self._drop or not self.want_up:
                    return "requested"
                idle = tunnel.activity.idle_for()
                if self.mode == "on-demand" and idle >= self.config.idle_timeout:
                    self.want_up = False
                    return f"idle {idle:.0f}s"
                poke = asyncio.ensure_future(self._poke.wait())
                await asyncio.wait(
                    {closed, poke}, timeout=IDLE_CHECK, return_when=asyncio.FIRST_COMPLETED
                )
                poke.cancel()
        finally:
            closed.cancel()

    async def supervise(self) -> None:
        """Keep exactly one tunnel while one is wanted, with backoff on failure."""
        backoff = Backoff(cap=self.backoff_cap)
        while True:
            self._poke.clear()
            if not self.want_up:
                self.state.update(tunnel_error=self._unwanted_reason())
                await self._wait_poke(None)
                continue
            self._drop = False
            self._set_tunnel("connecting")
            log.debug("tunnel connecting device=%s", self.config.device_id)
            try:
                tunnel = await open_tunnel(self.config, self.key, self.state.state.last_endpoint)
            except (OSError, asyncssh.Error) as exc:
                delay = backoff.next_delay()
                self._set_tunnel("down", why=f"connect failed: {exc or type(exc).__name__}")
                log.warning(
                    "tunnel connect failed on every relay endpoint, last error: %s; retry in %.1fs",
                    exc or type(exc).__name__,
                    delay,
                )
                await self._wait_poke(delay)
                continue
            self.tunnel = tunnel
            self._set_tunnel("up", tunnel)
            log.info(
                "tunnel up relay=%s port=%d remote_port=%d endpoint=%s transport=%s",
                tunnel.relay,
                tunnel.port,
                tunnel.remote_port,
                tunnel.endpoint,
                tunnel.transport,
            )
            reason = await self._hold(tunnel)
            await self._close_tunnel(f"tunnel ended: {reason}")
            log.info("tunnel down relay=%s reason=%s", tunnel.relay, reason)
            if time.time() - tunnel.since >= STABLE_AFTER:
                backoff.reset()
            if reason == "connection lost":
                await self._wait_poke(backoff.after_drop())

    async def _close_tunnel(self, why: str | None = None) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                await tunnel.close()
            self._set_tunnel("down", why=why)

    def _unwanted_reason(self) -> str:
        """Why no tunnel is wanted now, in words for `rly-client status`."""
        if self._checkin_error is not None:
            return f"check-in failed: {self._checkin_error}"
        if self._device_status not in (None, "accepted"):
            return f"device is {self._device_status}"
        if self.mode == "on-demand":
            return "on-demand: opens when a technician connects"
        return "not wanted"

    # -- check-ins -----------------------------------------------------------

    def _checkin_body(self, wait: float) -> dict[str, Any]:
        os_name, os_version = os_release()
        state = self.state.state
        return {
            "device_id": self.config.device_id,
            "client_version": __version__,
            "os_name": os_name,
            "os_version": os_version,
            "uptime": system_uptime(),
            "tunnel": {
                "state": state.tunnel_state,
                "relay": state.relay,
                "port": state.port,
                "since": state.since,
            },
            "wait": wait,
        } | ({} if self._acked is None else {"ack": self._acked})

    def _checkin_failed(self, exc: TrackerError) -> None:
        message = str(exc)
        if message != self._checkin_error:
            log.warning("check-in failed: %s", message)
        self._checkin_error = message
        known = {403: "revoked", 404: "unknown to the tracker"}.get(exc.status_code or 0)
        if known is not None:  # the tracker's word on the device beats the last reply's
            self._device_status = known
        self.state.update(
            last_checkin=time.time(),
            checkin_result=f"error: {message}",
            device_status=self._device_status,
        )
        if exc.status_code in REFUSED and self.want_up:
            log.warning("tracker refused this device; dropping the tunnel")
            self._set_want(False, drop=True)

    def _received(self, reply: CheckinReply) -> str:
        """The reply's action, or "none" when it was received before.

        The tracker sends an action again on every check-in until the device
        echoes its id as `ack`, so a reply lost with a cancelled long poll
        (a repair drops the tunnel just then) is not lost; a repeat is ignored.
        """
        if reply.action_id is None:
            return reply.action
        if reply.action == "none" or reply.action_id == self._acked:
            self._acked = self._acked or 0
            return "none"
        self._acked = reply.action_id
        return reply.action

    def _apply(self, reply: CheckinReply) -> None:
        """Turn a check-in reply into the wanted tunnel state."""
        action = self._received(reply)
        if self._checkin_error is not None:
            log.info("check-in ok again")
        self._checkin_error = None
        if reply.status != self._device_status:
            log.info("device status %s", reply.status)
            self._device_status = reply.status
        self.state.update(last_checkin=time.time(), checkin_result="ok", device_status=reply.status)
        self.config = placed(self.config, reply.relays)  # the tracker's relay order (issue 11)
        if reply.tunnel_mode in ("persistent", "on-demand"):
            self.mode = reply.tunnel_mode
        if reply.status != "accepted":
            if self.want_up:
                self._set_want(False, drop=True)
            return
        for dial in reply.dials:  # data connections asked for through the tracker
            self._data_dialer().request(dial)
        if action != "none":
            log.info("tracker asks: %s", action)
        if action == "reconnect":  # no tunnel (lost, or connecting): just come back now
            self._set_want(True, drop=self.tunnel is not None)
        elif action == "close":
            # persistent devices come straight back; on-demand ones go idle
            self._set_want(self.mode == "persistent", drop=True)
        elif (action == "open" or self.mode == "persistent") and not self.want_up:
            self._set_want(True)

    def _data_dialer(self) -> DataDialer:
        """The live tunnel's dialer (its activity keeps an on-demand tunnel up), else our own."""
        if self.tunnel is not None and self.tunnel.dialer is not None:
            return self.tunnel.dialer
        if self._dialer is None:
            from device_client.data_sessions import DataDialer

            self._dialer = DataDialer(self.config, Activity())
        return self._dialer

    async def _checkin_once(self) -> CheckinReply | None:
        """One long poll; None when a tunnel change cut it short (check in again)."""
        self._tunnel_changed.clear()
        # the first check-in, and the one after a tunnel change, answer at once so the
        # tracker and `rly-client status` learn the new state without waiting a long poll
        wait = 0.0 if self._report_now else LONG_POLL_WAIT
        self._report_now = False
        self._last_wait = wait
        request = asyncio.ensure_future(self.tracker.checkin(self._checkin_body(wait)))
        changed = asyncio.ensure_future(self._tunnel_changed.wait())
        await asyncio.wait({request, changed}, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        if request.done():
            return request.result()
        request.cancel()
        await asyncio.wait({request})  # unlike `await request`, keeps our own cancellation
        self._report_now = True
        return None

    async def checkins(self) -> None:
        """Check in forever; the tracker answers early when it wants something."""
        backoff = Backoff(cap=self.backoff_cap)
        while True:
            started = time.monotonic()
            try:
                reply = await self._checkin_once()
            except TrackerError as exc:
                self._checkin_failed(exc)
                await asyncio.sleep(max(backoff.next_delay(), MIN_CHECKIN_GAP))
                continue
            backoff.reset()
            if reply is None:
                continue
            self._apply(reply)
            # after an immediate report, go straight back to long-polling
            delay = checkin_delay(reply, time.time()) if self._last_wait else 0.0
            if reply.action == "none" and self._last_wait:  # a long poll answered at once
                delay = max(delay, MIN_CHECKIN_GAP - (time.monotonic() - started))
            if delay > 0:
                await asyncio.sleep(delay)

    async def run(self, stop: asyncio.Event) -> None:
        """Run both loops until stop is set, then close the tunnel."""
        tasks = [asyncio.create_task(self.supervise()), asyncio.create_task(self.checkins())]
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, waiter]:
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
        await self._close_tunnel()
        for task in tasks:
            if task in done and not task.cancelled() and (exc := task.exception()):
                raise exc


async def run_client(config: ClientConfig, config_path: Path, backoff_cap: float) -> int:
    """Entry point of `rly-client run`: returns 0 after SIGTERM or SIGINT."""
    key = asyncssh.read_private_key(str(config.key_file))
    state = StateFile(config.state_file, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "rly-client %s starting device=%s mode=%s target=%s",
        __version__,
        config.device_id,
        config.tunnel_mode,
        config.target,
    )
    async with TrackerClient(
        config.tracker_url,
        device_id=config.device_id,
        key=key,
        proxy=config.proxy,
        trust=tls_trust(config),
    ) as tracker:
        runner = Runner(
            config=config, key=key, tracker=tracker, state=state, backoff_cap=backoff_cap
        )
        try:
            await runner.run(stop)
        finally:
            state.update(
                tunnel_state="down", relay=None, port=None, since=None, stopped=time.time()
            )
    log.info("rly-client stopped")
    return 0
