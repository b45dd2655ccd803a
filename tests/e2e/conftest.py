"""Fixtures of the end-to-end tests."""

import pytest

from tests.e2e.guest_image import Image, ImageError, build_image


@pytest.fixture(scope="session")
def image() -> Image:
    """The guest image (built once, then cached on disk); the test fails if it cannot be built."""
    try:
        return build_image()
    except ImageError as e:
        pytest.fail("cannot build the guest image: %s" % e)
