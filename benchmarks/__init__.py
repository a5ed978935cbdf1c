"""Benchmarks: mlauth side by side with requests-oauthlib, Authlib and google-auth.

Scripts, not tests: each prints its table and takes its sizes from arguments; ``make bench``
runs them all at full size (:mod:`benchmarks.run_all`) and rewrites ``benchmarks/results/``
and the tables in ``BENCHMARKS.md``.
"""
