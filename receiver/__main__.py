"""`python -m receiver` is `episode-receiver`."""

from receiver.cli import main

if __name__ == "__main__":
    main()
