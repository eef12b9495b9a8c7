"""`python -m tccli ...` is the same as `tc ...` (and works under `torchrun -m tccli`)."""
from tccli.entry import main

if __name__ == "__main__":
    main()
