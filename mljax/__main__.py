import sys

from mljax.cli import main

sys.exit(main())
