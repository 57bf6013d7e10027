"""Fixtures that start real processes on loopback ports and always stop them.

- `process_factory`: start any command as a ManagedProcess.
- `sshd_factory`: a real OpenSSH server (a device's sshd).
- `rly_factory`: `rly serve` with a private data dir and config.
- `technician_factory`: the OpenSSH `ssh` client in a PTY.
- `browser` (session) and `page`: headless Chromium via Playwright.
- `pg_url` (session): a fresh PostgreSQL database, dropped at the end.

When a test fails, the output tails of the processes it started are printed
in its teardown section.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import Browser, Page

from tests.support.browser import browser_session, hidden_running_loop
from tests.support.pg import fresh_database
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory

REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell a failed test at teardown."""
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(autouse=True)
def _hide_playwright_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let tests without the browser use asyncio.run() after a browser test ran in this process."""
    if "browser" in request.fixturenames:
        yield
    else:
        with hidden_running_loop():
            yield


@pytest.fixture
def process_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessFactory]:
    """Start commands as ManagedProcesses; all are stopped at teardown."""
    factory = ProcessFactory(tmp_path)
    try:
        yield factory
    finally:
        if _failed(request):
            print(factory.report())
        factory.stop_all()


@pytest.fixture
def sshd_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SshdFactory]:
    """Start real OpenSSH servers; all are stopped at teardown."""
    factory = SshdFactory(tmp_path)
    try:
        yield factory
    finally:
        if _failed(request):
            print("\n".join(s.process.tail() for s in factory.servers if s.process))
        factory.stop_all()


@pytest.fixture
def rly_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RlyFactory]:
    """Start `rly serve` processes; all are stopped at teardown."""
    factory = RlyFactory(tmp_path)
    try:
        yield factory
    finally:
        if _failed(request):
            print("\n".join(s.process.tail() for s in factory.servers if s.process))
        factory.stop_all()


@pytest.fixture
def technician_factory(request: pytest.FixtureRequest) -> Iterator[TechnicianFactory]:
    """Start `ssh` sessions in PTYs; all are killed at teardown."""
    factory = TechnicianFactory()
    try:
        yield factory
    finally:
        if _failed(request):
            print("\n".join(f"--- ssh {t.argv}\n{t.output[-2000:]}" for t in factory.sessions))
        factory.close_all()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Headless Chromium for the whole session (do not mix with asyncio in the same test)."""
    with browser_session() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context (own cookies), closed at teardown."""
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database URL (postgresql+psycopg://...), dropped at session end.

    Unreachable PostgreSQL skips the test, or fails it when RLY_TEST_REQUIRE_POSTGRES=1.
    """
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_database())
        except psycopg.OperationalError as exc:
            message = f"PostgreSQL is unreachable: {str(exc).strip()}"
            if os.environ.get("RLY_TEST_REQUIRE_POSTGRES") == "1":
                pytest.fail(message)
            pytest.skip(message)
        yield url
