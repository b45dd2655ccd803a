"""Tests of the packages built from packaging/ (.deb, .rpm, wheel)."""
