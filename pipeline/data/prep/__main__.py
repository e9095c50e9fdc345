"""python -m pipeline.data.prep: the same as `simvlg prep` (the SLURM scripts in data_prep/ use it)."""

from .cli import main

raise SystemExit(main())
