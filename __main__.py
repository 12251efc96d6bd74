"""``python -m nlref``: the same command line as ``nested-learning``."""

from nlref.cli import main

if __name__ == "__main__":
    main()
