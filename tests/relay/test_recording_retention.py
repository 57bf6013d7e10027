"""relay.session.recording_retention with a real `rly serve`: expired files go, audited;
live ones stay.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from core.models import Account, AuditEvent, Device, SshSession
from tests.e2e.stack import wait_for
from tests.support.rly_server import RlyServer


def test_expired_recordings_are_deleted_and_audited_but_not_live_ones(tmp_path: Path) -> None:
    """With retention 3s the relay deletes an old file of an ended session (one audit row)
    and keeps an equally old file whose session is still running."""
    server = RlyServer(tmp_path, config={"relay": {"recording_retention": "3s"}})
    server.start()
    try:
        engine = create_engine(f"sqlite:///{server.data_dir / 'rly.sqlite3'}")
        with Session(engine) as s, s.begin():
            account = Account(name="acme")
            s.add(account)
            s.flush()
            s.add(
                Device(
                    id="dev1", account_id=account.id, hostname="h", serial="s",
                    public_key="k", key_fingerprint="fp", status="accepted",
                )
            )  # fmt: skip
            s.flush()
            s.add(
                SshSession(id="livesess", device_id="dev1", relay_node="n", account_id=account.id)
            )
        recordings = server.data_dir / "recordings"
        recordings.mkdir(mode=0o700, exist_ok=True)
        old = time.time() - 3600
        for name in ("livesess", "endedsess"):
            path = recordings / f"{name}.cast"
            path.write_text('{"version": 2, "width": 80, "height": 24}\n')
            os.utime(path, (old, old))
        wait_for(lambda: not (recordings / "endedsess.cast").exists(), 10, "the expired file gone")
        time.sleep(2.5)  # at least two more sweeps
        assert (recordings / "livesess.cast").exists()
        with Session(engine) as s:
            rows = list(
                s.scalars(select(AuditEvent).where(AuditEvent.action == "recording.expired"))
            )
        assert [r.detail.split()[0] for r in rows] == ["session=endedsess"]
        engine.dispose()
    finally:
        server.stop()
