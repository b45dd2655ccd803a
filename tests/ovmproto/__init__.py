"""Tests of the wire protocol (ovmproto/)."""
