from ociworker.cli import main
import sys
sys.exit(main())
