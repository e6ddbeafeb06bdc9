"""The render service: Liquid templates rendered at send time with the live customer profile."""
