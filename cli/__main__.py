"""``python -m cli <stage> ...`` = ``align <stage> ...`` (what ``accelerate launch -m cli`` runs)."""

import sys

from cli.main import main

sys.exit(main())
