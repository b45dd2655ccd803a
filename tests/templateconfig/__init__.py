"""Tests of template configuration (templateconfig/)."""
