"""``python -m featup_adapters ...`` is the ``featup-adapters`` command line (see cli.py)."""
from featup_adapters.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
