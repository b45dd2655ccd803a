"""Fixtures for every test: the guard that keeps tests off the real daemons' paths, short
directories for unix sockets, and the tests' own PostgreSQL cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import guard, postgres, tempdirs


@pytest.fixture(scope="session", autouse=True)
def real_paths_session() -> Iterator[guard.Guard]:
    """The guard for the whole session (tests/support/guard.py); what the last fixtures did on
    their way out fails the session."""
    with guard.session() as g:
        yield g
        problems = g.take_problems()
        if problems:
            pytest.fail(guard.report(problems), pytrace=False)


@pytest.fixture(autouse=True)
def real_paths_guard(real_paths_session: guard.Guard) -> Iterator[guard.Guard]:
    """Fails the test if it, or a program it started, touched /etc/ovmd.conf, /run/ovmd,
    /run/hostbridge (or the bridge's /etc/hostbridge, /var/lib/hostbridge)."""
    yield real_paths_session
    problems = real_paths_session.take_problems()
    if problems:
        pytest.fail(guard.report(problems), pytrace=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (a unix socket's path must fit in 108 bytes)."""
    with tempdirs.short_dir() as path:
        yield path


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.PostgresCluster]:
    """The suite's PostgreSQL cluster (tests/support/postgres.py), started once: the first test
    that asks pays initdb and the start; stopped and removed at the end of the session."""
    try:
        cluster = postgres.PostgresCluster()
    except postgres.PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with cluster:
        yield cluster


@pytest.fixture
def postgres_server(postgres_cluster: postgres.PostgresCluster) -> postgres.PostgresCluster:
    """The shared cluster, running: started again if an earlier test stopped or killed it."""
    return postgres_cluster.start()
