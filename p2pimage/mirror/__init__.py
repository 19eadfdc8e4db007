"""Serving the runtime: the mirror's blob service and runtime mirror configuration."""
