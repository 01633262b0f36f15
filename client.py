"""Command-line client: ``python client.py COMMAND ...`` (see README.md).

Only the entry script: the client and its command line live in cli.py.
Python compiles a script from source on every run but caches the bytecode
of an imported module, so keeping this file tiny takes compiling ~1,900
lines off every start-up.  ``import client`` (tests, bench) gets cli itself.
"""

import sys

import cli

if __name__ == "__main__":
    sys.exit(cli.main())
# Imported, not run: ``client`` and ``cli`` are one module, so ``client.Client``,
# ``client.EXIT_OK`` and monkeypatching ``client.open_source`` all reach cli.
sys.modules[__name__] = cli
