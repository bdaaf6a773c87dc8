"""The wlcad gRPC services, each a thin adapter from its proto to one pipeline."""
