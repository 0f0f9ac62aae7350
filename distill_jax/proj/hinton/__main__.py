"""``python -m distill_jax.proj.hinton quick|full --config=... [--runs=... --results=...]``."""

import sys

from distill_jax import cli

COMMANDS = {"quick": "reproduce", "full": "reproduce-full"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(cli.main([sys.argv[0], COMMANDS[sys.argv[1]], *sys.argv[2:]]))
