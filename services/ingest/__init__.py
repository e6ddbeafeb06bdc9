"""Ingest: validates customer events and stores them durably in the event log."""
