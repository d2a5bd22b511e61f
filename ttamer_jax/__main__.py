import sys

from ttamer_jax.app.cli import main

sys.exit(main())
