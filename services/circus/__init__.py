"""wlcad as a CIRCUS CS plug-in: the Docker entrypoint (``CAD``), the remote endpoint
(``CAD+remote``) and the image build, one plug-in per capability (see docs/circus.md)."""
