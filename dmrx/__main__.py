# `python -m dmrx ...` (and `torchrun -m dmrx train ...`) run the same app as the `dmrx` script.
from dmrx.cli.app import main

main()
