"""What the triggers service needs from the other services at fire time, as the small
interfaces its engine is written against: the live profile (the profile service) and a rendered
message (the render service). The gRPC clients in ``triggers.clients`` implement them; tests of
the engine may give their own."""

from __future__ import annotations

from typing import Protocol

from google.protobuf import struct_pb2

from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2


class DependencyUnavailable(Exception):
    """The service could not answer now (down, overloaded, timed out): try again later. Never
    a reason to end an episode."""


class ProfileReader(Protocol):
    async def get_profile(self, customer_id: str) -> profile_pb2.Profile | None:
        """The customer's live profile; None when no customer has the id (erased, or merged
        into another and gone).

        Raises:
            DependencyUnavailable: the profile service could not answer.
        """
        ...


class MessageRenderer(Protocol):
    async def render(
        self, template: str, customer_id: str, variables: struct_pb2.Struct
    ) -> render_pb2.RenderResponse:
        """The stored template ``templates/{id}`` (its published version) rendered for the
        customer with the live profile. A render that fell back (no live profile) or was
        skipped is returned as it is: the caller decides.

        Raises:
            DependencyUnavailable: the render service could not answer.
            LookupError: no such template (deleted since the trigger was saved).
        """
        ...
