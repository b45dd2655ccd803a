"""The directory the test guard puts first on every child's PYTHONPATH (see tests/support/guard.py):
it holds only the guard's hook and the sitecustomize that installs it in each Python child."""
