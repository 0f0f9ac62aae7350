"""``python -m distill_jax.proj.reasoning --config=experiments/reasoning_r1.py[:profile] [--runs=... --results=...]``."""

import sys

from distill_jax import cli

if __name__ == "__main__":
    sys.exit(cli.main([sys.argv[0], "reproduce-reasoning", *sys.argv[1:]]))
