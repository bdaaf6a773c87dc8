"""wlcad services: the core Volume type, one pipeline package per capability, and thin adapters."""
