"""The triggers service: durable timers that fire once per episode, and signed deliveries."""
