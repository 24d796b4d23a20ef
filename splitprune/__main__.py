import sys

from splitprune.cli import main

sys.exit(main())
