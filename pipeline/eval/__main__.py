"""`python -m pipeline.eval CONFIG --checkpoint DIR ...` (e.g. under torchrun for several ranks)."""

from .run import main

raise SystemExit(main())
