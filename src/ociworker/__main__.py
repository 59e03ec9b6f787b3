import sys

from ociworker.cli import main

sys.exit(main())
