"""Tests of the built-in modules (templateconfig/builtin/)."""
