"""``python -m laplacefim``: the same as the ``laplacefim`` command."""

from laplacefim.cli import main

raise SystemExit(main())
