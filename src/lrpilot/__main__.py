import sys

from lrpilot.cli import main

sys.exit(main())
