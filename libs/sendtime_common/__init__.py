"""What the Sendtime services share: config parsing, logging, telemetry, errors, the gRPC
server bootstrap and the durable event log."""
