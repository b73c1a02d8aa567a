"""``python -m regfit.data --from-test-set SRC --out DST``: see :mod:`regfit.data.offline`."""

from regfit.data.offline import main

if __name__ == "__main__":
    raise SystemExit(main())
