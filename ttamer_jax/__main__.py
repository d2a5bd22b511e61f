import sys

from ttamer_jax.cli import main

sys.exit(main())
