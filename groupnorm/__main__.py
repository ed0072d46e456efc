"""``python -m groupnorm ...``: the same as the ``groupnorm`` command (groupnorm.cli)."""
from groupnorm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
