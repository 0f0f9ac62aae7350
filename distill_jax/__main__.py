import sys

from distill_jax.cli import main

sys.exit(main())
