"""``python -m governor``: the same as the ``gpu-governor`` command."""

import sys

from governor.earlysignals import console_main

sys.exit(console_main())
