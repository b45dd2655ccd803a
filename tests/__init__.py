"""The test suite as one package (``tests.*``): see tests/support/__init__.py for why."""
