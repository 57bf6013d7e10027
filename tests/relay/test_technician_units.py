"""Device lookup against a temporary SQLite database, and the pre-auth limiter, without servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core.db import make_engine, make_sessions, upgrade
from core.models import Account, Device, Tunnel, utcnow
from relay.preauth import PENALTY_CAP, PreauthLimiter, RefusalLog
from relay.technician.device_lookup import (
    AMBIGUOUS,
    NO_MATCH,
    NOT_CHECKING_IN,
    PAGE_SIZE,
    DeviceInfo,
    LookupFailure,
    below_minimum,
    list_devices,
    resolve,
)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    with make_sessions(engine)() as s:
        s.add_all([Account(id=1, name="acme"), Account(id=2, name="other")])
        s.flush()
        yield s
    engine.dispose()


def _device(s: Session, device_id: str, account: int, hostname: str, **kw: object) -> Device:
    values: dict[str, object] = {
        "serial": f"SN-{device_id}",
        "status": "accepted",
        "client_version": "2.0.0",
        "last_checkin_at": utcnow(),
        **kw,
    }
    device = Device(
        id=device_id,
        account_id=account,
        hostname=hostname,
        public_key="k",
        key_fingerprint=f"fp-{device_id}",
        **values,
    )
    s.add(device)
    s.flush()
    return device


def test_resolve_by_id_hostname_any_case_and_serial(session: Session) -> None:
    """A device is found by its id, its hostname in any case, or its exact serial."""
    _device(session, "aaaaaaaaaa", 1, "Nas-One")
    for name in ("aaaaaaaaaa", "AAAAAAAAAA", "nas-one", "NAS-ONE", "SN-aaaaaaaaaa"):
        found = resolve(session, account_id=1, name=name)
        assert isinstance(found, DeviceInfo) and found.id == "aaaaaaaaaa", name
    assert isinstance(resolve(session, account_id=1, name="nas"), LookupFailure)  # exact only


def test_other_accounts_device_looks_like_no_device(session: Session) -> None:
    """A device of another account gives the same answer as a device that does not exist."""
    _device(session, "bbbbbbbbbb", 2, "theirs")
    hidden = resolve(session, account_id=1, name="theirs")
    missing = resolve(session, account_id=1, name="nothing")
    assert isinstance(hidden, LookupFailure) and isinstance(missing, LookupFailure)
    assert hidden.error == missing.error == NO_MATCH
    assert "bbbbbbbbbb" not in hidden.reason


def test_ambiguous_hostname_lists_candidates(session: Session) -> None:
    """Two devices with one hostname: the answer names both so one can pick by id."""
    _device(session, "cccccccccc", 1, "twin")
    _device(session, "dddddddddd", 1, "TWIN")
    found = resolve(session, account_id=1, name="twin")
    assert isinstance(found, LookupFailure)
    assert {c.id for c in found.candidates} == {"cccccccccc", "dddddddddd"}


def test_classification(session: Session) -> None:
    """Never checked in, too old and pending devices get the seed's words and a reason."""
    _device(session, "eeeeeeeeee", 1, "quiet", last_checkin_at=None)
    _device(session, "ffffffffff", 1, "old", client_version="1.9.10")
    _device(session, "gggggggggg", 1, "new", client_version="1.10.0")
    _device(session, "hhhhhhhhhh", 1, "waiting", status="pending")
    quiet = resolve(session, account_id=1, name="quiet", min_client_version="1.10")
    old = resolve(session, account_id=1, name="old", min_client_version="1.10")
    new = resolve(session, account_id=1, name="new", min_client_version="1.10")
    waiting = resolve(session, account_id=1, name="waiting")
    assert isinstance(quiet, LookupFailure) and quiet.error == NOT_CHECKING_IN
    assert isinstance(old, LookupFailure) and old.error == NO_MATCH and "1.9.10" in old.reason
    assert isinstance(new, DeviceInfo)
    assert isinstance(waiting, LookupFailure) and "pending" in waiting.reason
    assert isinstance(resolve(session, account_id=1, name="quiet", check=False), DeviceInfo)


def test_versions_compare_numerically() -> None:
    """3.53.17 is not below 3.9; an unknown version is below any minimum; no minimum allows all."""
    assert not below_minimum("3.53.17", "3.9")
    assert below_minimum("3.9", "3.53.17")
    assert below_minimum("", "1.0")
    assert not below_minimum("", "")


def test_list_pages_filters_and_marks_online(session: Session) -> None:
    """list shows 20 per page, filters by substring on id/hostname/serial, and knows online."""
    for i in range(PAGE_SIZE + 5):
        _device(session, f"k{i:09d}", 1, f"host-{i:02d}")
    _device(session, "zzzzzzzzzz", 2, "host-foreign")
    session.add(
        Tunnel(device_id="k000000003", relay_node="n", listen_port=1, peer_ip="1.2.3.4",
               peer_port=5, transport_port=2200)
    )  # fmt: skip
    session.flush()
    first, total = list_devices(session, account_id=1)
    second, _ = list_devices(session, account_id=1, page=2)
    assert total == PAGE_SIZE + 5 and len(first) == PAGE_SIZE and len(second) == 5
    assert {d.id for d in first} & {d.id for d in second} == set()
    online = {d.id: d.state for d in first}
    assert online["k000000003"] == "online" and online["k000000004"] == "offline"
    matches, count = list_devices(session, account_id=1, pattern="HOST-1")
    assert count == 10 and all("host-1" in d.hostname for d in matches)
    assert list_devices(session, account_id=1, pattern="%")[1] == 0  # wildcards are literal


def test_device_text_is_stripped_of_controls(session: Session) -> None:
    """Hostnames a device sent with escape sequences are shown without control characters."""
    _device(session, "mmmmmmmmmm", 1, "evil\x1b[2Jbox")
    found = resolve(session, account_id=1, name="mmmmmmmmmm")
    assert isinstance(found, DeviceInfo) and found.hostname == "evil[2Jbox"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_preauth_caps_total_and_per_source() -> None:
    """Unauthenticated connections are capped per source and in total; release frees a slot."""
    limiter = PreauthLimiter(max_total=3, max_per_source=2)
    assert limiter.admit("a") and limiter.admit("a")
    assert not limiter.admit("a")
    assert limiter.admit("b")
    assert not limiter.admit("c")
    limiter.release("a")
    assert limiter.admit("c")


def test_refusals_are_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    """A storm of refused connections gives one line at once and one summary per interval."""
    logger = logging.getLogger("test.refusals")

    async def storm() -> None:
        refusals = RefusalLog(logger, "device", interval=0.2)
        limiter = PreauthLimiter(max_total=1, max_per_source=1, refusals=refusals)
        assert limiter.admit("10.0.0.1")
        for i in range(500):
            assert not limiter.admit(f"10.0.{i % 7}.2")
        await asyncio.sleep(0.3)  # one summary
        assert not limiter.admit("10.0.9.9")
        await asyncio.sleep(0.5)  # a second summary, then a quiet interval ends the burst
        assert not limiter.admit("10.0.8.8")  # logged at once again

    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        asyncio.run(storm())
    lines = [r.getMessage() for r in caplog.records if r.name == "test.refusals"]
    assert lines == [
        "device connection refused: pre-auth limit from=10.0.0.2",
        "device connections refused: pre-auth limit, 499 more in the last 0.2s from 7 sources",
        "device connections refused: pre-auth limit, 1 more in the last 0.2s from 1 sources",
        "device connection refused: pre-auth limit from=10.0.8.8",
    ]


def test_penalty_grows_caps_and_decays() -> None:
    """A failing source waits longer each time, at most the cap, and is forgiven over time."""
    clock = FakeClock()
    limiter = PreauthLimiter(max_total=10, max_per_source=10, clock=clock)
    delays = [limiter.failure("x") for _ in range(8)]
    assert delays == sorted(delays) and delays[0] < delays[3]
    assert max(delays) == PENALTY_CAP
    assert limiter.current_penalty("y") == 0.0
    clock.now += 3600
    assert limiter.current_penalty("x") < 0.01
    assert timedelta(seconds=delays[-1]) <= timedelta(seconds=PENALTY_CAP)


def test_a_live_tunnel_is_proof_enough(session: Session) -> None:
    """A device that never checked in but holds a tunnel (plain `ssh -R`) is connectable."""
    _device(session, "nnnnnnnnnn", 1, "openssh-box", last_checkin_at=None, client_version="")
    session.add(
        Tunnel(device_id="nnnnnnnnnn", relay_node="n", listen_port=1, peer_ip="1.2.3.4",
               peer_port=5, transport_port=2200)
    )  # fmt: skip
    session.flush()
    found = resolve(session, account_id=1, name="openssh-box")
    assert isinstance(found, DeviceInfo) and found.online
    _device(session, "pppppppppp", 1, "gone-box", last_checkin_at=None)
    gone = resolve(session, account_id=1, name="gone-box")
    assert isinstance(gone, LookupFailure) and gone.error == NOT_CHECKING_IN
    assert "no tunnel" in gone.reason


def test_an_ambiguous_name_says_so(session: Session) -> None:
    """A hostname two devices share is announced as ambiguous, not as 'no matching clients'."""
    _device(session, "qqqqqqqqqq", 1, "twin")
    _device(session, "rrrrrrrrrr", 1, "other", serial="twin")
    found = resolve(session, account_id=1, name="twin")
    assert isinstance(found, LookupFailure)
    assert found.error == AMBIGUOUS and found.error != NO_MATCH
    assert "twin" in found.reason and "2 devices" in found.reason
    assert [c.id for c in found.candidates] == ["qqqqqqqqqq", "rrrrrrrrrr"]
    assert found.one_line == f"{AMBIGUOUS}: use a device id (qqqqqqqqqq, rrrrrrrrrr)"
