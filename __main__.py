"""``python -m nested_learning``: the same command line as ``nested-learning``."""

from nested_learning.cli import main

if __name__ == "__main__":
    main()
