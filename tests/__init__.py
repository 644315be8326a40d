"""The test suite, a package: shared helpers are imported as `tests.worlds`, `tests.procs`, `tests.scripts`."""
