"""python -m bertq"""

import sys

from bertq.cli import main

sys.exit(main())
