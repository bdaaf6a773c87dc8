"""The wlcad.v1 API in Python: generated messages (``services.api.pb``) and conversions to wlcad types."""
