"""Device emulators built from hardware.md's tables, for the tests and ``tillsync demo``."""
