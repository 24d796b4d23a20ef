import sys

from splitprune_device.cli import main

sys.exit(main())
