"""Tests of the host bridge (hostbridge/) and its command-line tools."""
