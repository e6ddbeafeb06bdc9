"""Wiring of the ingest service: event log, ingestor, gRPC server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ingest.ingestor import Ingestor
from ingest.servicer import IngestServicer
from ingest.settings import Settings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.event_log import EventLog, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@dataclass(slots=True)
class IngestApp:
    grpc: GrpcServer
    event_log: EventLog

    async def start(self) -> None:
        await self.grpc.start()

    async def stop(self, grace_s: float) -> None:
        """Drain calls, then close the event log (in-flight publishes finish first)."""
        await self.grpc.stop(grace_s)
        await self.event_log.close()


async def create_app(settings: Settings, event_log: EventLog | None = None) -> IngestApp:
    """Connect to the event log (unless one is given) and build the server, not yet started.

    Raises:
        sendtime_common.event_log.EventLogUnavailable: NATS could not be reached.
    """
    if event_log is None:
        event_log = await JetStreamEventLog.connect(settings.event_log)
    ingestor = Ingestor(event_log, max_future_skew=timedelta(seconds=settings.max_future_skew_s))
    servicer = IngestServicer(
        ingestor,
        max_batch_size=settings.max_batch_size,
        max_in_flight_per_stream=settings.max_in_flight_per_stream,
    )
    server = GrpcServer(
        settings.address,
        [SERVICE_NAME],
        lambda s: ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, s),
    )
    return IngestApp(grpc=server, event_log=event_log)
