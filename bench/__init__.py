"""Benchmarks of rly against plain OpenSSH; run with `python -m bench` (see __main__)."""
