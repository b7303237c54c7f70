"""Reads Cloud Foundry usage every hour and publishes it to usage.readings.v1 through a transactional outbox."""
