"""The tracker's operations: one short transaction each, run off the event loop.

A check-in records itself and answers at once when an action is due;
otherwise it long-polls on the hub (no transaction open) and re-reads.
A device whose key is cached takes the fast path: one UPDATE ... RETURNING,
group-committed with other check-ins by one writer thread (tracker.batch).
Everything else, refusals included, takes the full path (read, verify, write).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from core import metrics
from core.config import Settings
from core.hub import Hub
from core.keys import KeyStore
from core.signing import HEADER_DEVICE
from core.validate import DEVICE_ID_RE
from tracker import checkins, registry
from tracker.auth import SignedRequest, Verifier
from tracker.batch import BatchWriter
from tracker.checkins import DeviceState, Due
from tracker.errors import ApiError
from tracker.placement import Placement, enroll_endpoints
from tracker.schemas import (
    CheckinReply,
    CheckinRequest,
    DeviceView,
    EnrollReply,
    EnrollRequest,
)


@dataclass
class Tracker:
    settings: Settings
    sessions: sessionmaker[Session]
    hub: Hub
    keys: KeyStore
    verifier: Verifier
    _writer: BatchWriter[tuple[DeviceState, Due] | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        engine = self.sessions.kw["bind"]
        assert isinstance(engine, Engine)
        self._writer = BatchWriter(engine, name="tracker-checkins")
        self._placement = Placement(self.sessions)

    # -- enrollment ----------------------------------------------------------

    async def enroll(self, *, body: EnrollRequest, source_ip: str) -> EnrollReply:
        return await asyncio.to_thread(self._enroll, body, source_ip)

    def _enroll(self, body: EnrollRequest, source_ip: str) -> EnrollReply:
        mode = self.settings.tracker.tunnel_mode
        with self.sessions() as session, session.begin():
            device = registry.enroll(session, body=body, tunnel_mode=mode, source_ip=source_ip)
            hosts, ports = enroll_endpoints(session, device.id) or registry.relay_endpoints(session)
        metrics.inc("rly_enrollments_total")  # committed
        relay = self.settings.relay
        return EnrollReply(
            device_id=device.id,
            status="accepted" if device.status == "accepted" else "pending",
            relay_hosts=hosts or [relay.public_host or self._public_url_host()],
            relay_ports=ports or list(relay.device_ports),
            relay_host_ca=self.keys.host_ca_public,
            user_ca=self.keys.user_ca_public,
            login_user=device.login_user,
            tunnel_mode="on-demand" if mode == "on-demand" else "persistent",
            checkin_interval=self.settings.tracker.checkin_interval,
        )

    def _public_url_host(self) -> str:
        return urlsplit(self.settings.http.public_url).hostname or "localhost"

    # -- check-ins -----------------------------------------------------------

    async def checkin(
        self, *, report: CheckinRequest, request: SignedRequest, ip: str
    ) -> CheckinReply:
        device_id = signed_device(request)
        wait = min(report.wait, self.settings.tracker.checkin_wait)
        # a long poll listens from before its first read: a request written between that
        # read and the wait (a repair's reconnect, just as the device checks in) still wakes it
        woken = asyncio.Event()
        unsubscribe = self.hub.subscribe(f"device:{device_id}", woken.set) if wait > 0 else None
        try:
            done = None
            if report.device_id == device_id and self.verifier.knows(device_id):
                done = await self._writer.run(self._record_known(device_id, report, request, ip))
            if done is None:
                done = await asyncio.to_thread(self._checkin_full, device_id, report, request, ip)
            state, due = done
            metrics.inc("rly_checkins_total")  # verified and recorded
            if due.action == "none" and wait > 0:
                state, due = await self._long_poll(device_id, state, wait, report.ack, woken)
        finally:
            if unsubscribe is not None:
                unsubscribe()
        return CheckinReply(
            status="accepted" if state.status == "accepted" else "pending",
            action=due.action,
            action_id=due.action_id,
            tunnel_mode=state.tunnel_mode,
            next_checkin=0.0 if wait > 0 else self.settings.tracker.checkin_interval,
            server_time=time.time(),
            relays=await self._placement.relays_for(device_id),
        )

    def _record_known(
        self, device_id: str, report: CheckinRequest, request: SignedRequest, ip: str
    ) -> Callable[[Connection], tuple[DeviceState, Due] | None]:
        """The fast path as a batch job: verify with the cached key, one UPDATE ... RETURNING.

        The job returns None (nothing written) whenever the full path must
        decide: no cached key, a signature that does not verify with it, a
        stored key that changed, a stale stamp, a revoked or unknown device.
        """

        def job(conn: Connection) -> tuple[DeviceState, Due] | None:
            known = self.verifier.verify_known(device_id=device_id, request=request)
            if known is None:
                return None
            key_text, stamp = known
            state = checkins.record_known(
                conn, device_id=device_id, key_text=key_text, stamp=stamp, report=report, ip=ip
            )
            if state is None:
                return None
            due = checkins.take_action_on(conn, device_id=device_id, state=state, ack=report.ack)
            return state, due

        return job

    def _checkin_full(
        self, device_id: str, report: CheckinRequest, request: SignedRequest, ip: str
    ) -> tuple[DeviceState, Due]:
        """Read the device, verify, refuse precisely (nothing written), or record."""
        with self.sessions() as session, session.begin():
            state, stamp = checkins.authenticate(
                session, verifier=self.verifier, device_id=device_id, request=request
            )
            if report.device_id != device_id:
                raise ApiError(400, f"device_id does not match the {HEADER_DEVICE} header")
            checkins.record_checkin(session, device_id=device_id, stamp=stamp, report=report, ip=ip)
            due = checkins.take_action(session, device_id=device_id, state=state, ack=report.ack)
            return state, due

    async def _long_poll(
        self, device_id: str, first: DeviceState, wait: float, ack: int | None, woken: asyncio.Event
    ) -> tuple[DeviceState, Due]:
        """Wait for a wake-up that brings an action or a status change; read only when woken.

        Every change a check-in answer carries (status, tunnel mode, a tunnel
        request) sets `tunnel_request_at` and publishes `device:<id>`, and the
        change feed turns it into a wake-up in every process (core.feed: NOTIFY, or
        its poll on SQLite and as the safety net). So a wait that ran out without
        one answers what the last read saw, with no second read: the database
        work of a quiet long poll is its first, recording, statement.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        last = (first, checkins.NOTHING_DUE)
        while not self.hub.closing and (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    await woken.wait()
            except TimeoutError:
                break
            woken.clear()
            state, due = last = await asyncio.to_thread(self._poll, device_id, ack)
            if due.action != "none" or (state.status, state.tunnel_mode) != (
                first.status,
                first.tunnel_mode,
            ):
                return state, due
        return last

    def _poll(self, device_id: str, ack: int | None) -> tuple[DeviceState, Due]:
        with self.sessions() as session, session.begin():
            state = checkins.read_state(session, device_id=device_id)
            if state is None:
                raise ApiError(404, "unknown device")
            if state.status == "revoked":
                raise ApiError(403, "device revoked")
            return state, checkins.take_action(session, device_id=device_id, state=state, ack=ack)

    # -- a device's own view ---------------------------------------------------

    async def device_view(self, *, device_id: str, request: SignedRequest) -> DeviceView:
        if signed_device(request) != device_id:
            raise ApiError(403, "a device may only read its own status")
        return await asyncio.to_thread(self._device_view, device_id, request)

    def _device_view(self, device_id: str, request: SignedRequest) -> DeviceView:
        with self.sessions() as session, session.begin():
            _state, stamp = checkins.authenticate(
                session, verifier=self.verifier, device_id=device_id, request=request
            )
            checkins.record_request(session, device_id=device_id, stamp=stamp)
            return registry.device_view(session, device_id=device_id)


def signed_device(request: SignedRequest) -> str:
    """The device id header: 401 when missing, 404 when it cannot be a device id."""
    device_id = request.headers.get(HEADER_DEVICE)
    if not device_id:
        raise ApiError(401, "missing signature headers")
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ApiError(404, "unknown device")
    return device_id
