"""`python -m mtlsparse ...`: the same command line as the `mtlsparse` console script."""
from mtlsparse.cli import main

if __name__ == "__main__":
    main()
