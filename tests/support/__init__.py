"""Support code the test modules share: fixtures, factories, harnesses, scenarios and checkers. Nothing here
is collected as a test; the test modules import what they use (fixtures with ``# noqa: F401  (fixture)``).
``tests/conftest.py`` registers this package for pytest's assertion rewriting."""
