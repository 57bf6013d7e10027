"""Test harness: real processes on loopback ports, always stopped at teardown."""
