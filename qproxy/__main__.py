import sys

from qproxy.cli import main

sys.exit(main())
