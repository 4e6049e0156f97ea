"""``python -m t2ialign`` (also what ``accelerate launch -m t2ialign`` runs)."""

import sys

from t2ialign.core.cli import main

sys.exit(main())
