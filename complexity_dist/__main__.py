import sys

from complexity_dist.cli import main

sys.exit(main())
