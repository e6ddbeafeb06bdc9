"""The sync service (issue 20): two-way data flow with CRM and email-platform APIs.

Connectors pull what changed at a provider since a durable cursor (a CRM's contacts, an email
platform's members and suppressions) and hand each record to ingest as an event with a
deterministic id and a provenance source (crm or email), so that ingest's validation and
deduplication and profile's source priority apply as to any event. Pushes go the other way:
selected traits, batched and rate-limited, to the email platforms.

Built so far: ``provider_http`` (one provider's API: credentials, OAuth 2.0, its published rate,
retries, a circuit breaker) and the HubSpot contacts pull (``hubspot``). docs/connectors.md.
"""
