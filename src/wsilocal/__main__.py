"""``python -m wsilocal`` (also what ``torchrun -m wsilocal`` runs)."""

from wsilocal.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
