"""A small mock upstream API, run as its own process."""
