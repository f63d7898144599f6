from __future__ import annotations

import sys

from peerd.cli.main import main

sys.exit(main())
