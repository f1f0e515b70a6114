"""python -m teachdiag ... (same as the `teachdiag` console script)."""

from teachdiag.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
