"""``python -m fluxpipe.cli`` (how torchrun starts `fluxpipe train` processes)."""

import sys

from fluxpipe.cli import main

sys.exit(main())
