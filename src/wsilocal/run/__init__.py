"""The run directory that ``wsilocal train`` and ``wsilocal baseline`` write and everything else reads
(:mod:`wsilocal.run.directory`)."""
