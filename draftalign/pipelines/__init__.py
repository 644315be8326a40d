"""Stage drivers: thin wiring of Ray Data / Ray Train to the library code."""
