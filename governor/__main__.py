"""``python -m governor``: the same as the ``gpu-governor`` command."""

import sys

from governor.earlysignals import hold_for_run

hold_for_run(sys.argv[1:])  # before the heavy imports: a SIGHUP during start-up is queued

from governor.cli import main  # noqa: E402

sys.exit(main())
