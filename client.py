"""Command-line client: ``python client.py COMMAND ...`` (see README.md).

Only the entry script: the client and its command line live in cli.py.
Python compiles a script from source on every run but caches the bytecode
of an imported module, so keeping this file tiny takes compiling ~1,900
lines off every start-up.  ``import client`` (tests, bench) gets cli itself.

The garbage collector, run as a command: off while the modules load (they
make no garbage, and its passes over their objects cost ~2 ms), then the
objects of every loaded module are frozen out of its passes, once after the
imports and once more before exit.  Exiting, Python collects every tracked
object one last time: with ~100 modules loaded that pass cost ~8 ms of each
command, for objects the process frees by ending anyway.  Nothing else of
the exit is skipped: atexit, flushing and closing streams run as usual (a
download to stdout also flushes it itself, cli.Client._download).
"""

import gc
import sys

if __name__ == "__main__":
    gc.disable()

import cli

if __name__ == "__main__":
    gc.freeze()
    gc.enable()
    status = cli.main()
    gc.freeze()
    sys.exit(status)
# Imported, not run: ``client`` and ``cli`` are one module, so ``client.Client``,
# ``client.EXIT_OK`` and monkeypatching ``client.open_source`` all reach cli.
sys.modules[__name__] = cli
