"""`python -m tccli ...` is the same as `tc ...` (and works under `torchrun -m tccli`)."""

from tccli.cli.entry import main

if __name__ == "__main__":
    main()
