import sys

from hybrid_tools.report.cli import main

sys.exit(main())
