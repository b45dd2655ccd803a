"""Fixtures of the pool store's tests (test_pgstore*.py): a database of the test's own in the
suite's PostgreSQL cluster, and the stores a test opens (pool_harness.open_pg), closed at the
test's end."""

import uuid

import pytest


@pytest.fixture
def pg_url(postgres_server):
    """A database of this test's own in the suite's cluster."""
    return postgres_server.create_database("pgstore_%s" % uuid.uuid4().hex[:12])


@pytest.fixture
def stores():
    """Every store a test opens, closed at its end."""
    opened = []
    yield opened
    for s in opened:
        s.close()
