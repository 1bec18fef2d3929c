"""`python -m bench`: the throughput benchmark (see bench/throughput.py and the README)."""

from bench.throughput import main

main()
