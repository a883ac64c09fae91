import sys

from qproxy.ops.cli import main

sys.exit(main())
