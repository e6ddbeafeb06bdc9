"""The ``sendtime`` command line: operator tools that talk to the services over gRPC.

Run it as ``bin/sendtime COMMAND ...`` (or ``python -m sendtime_cli``); ``sendtime --help`` lists
the commands. ``sendtime import FILE`` bulk-loads events into ingest (see docs/import.md).
"""

import os

# gRPC core's INFO lines (such as a GOAWAY from a service stopping) are not for a terminal; its
# errors still show. Set before any command imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
