"""`python -m shipper` is `episode-shipper`."""

from shipper.cli import main

if __name__ == "__main__":
    main()
