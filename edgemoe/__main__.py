import sys

from edgemoe.cli.main import main

sys.exit(main())
