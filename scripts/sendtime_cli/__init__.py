"""The ``sendtime`` command line: operator tools that talk to the services over gRPC.

Run it as ``bin/sendtime COMMAND ...`` (or ``python -m sendtime_cli``); ``sendtime --help`` lists
the commands. ``sendtime import FILE`` bulk-loads events into ingest (see docs/import.md).
"""
