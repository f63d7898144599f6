from __future__ import annotations

import sys

from peerd.cli import main

sys.exit(main())
