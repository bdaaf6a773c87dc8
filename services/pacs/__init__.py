"""PACS round trip over DICOMweb: fetch a series (WADO-RS), store results (STOW-RS), find them (QIDO-RS).

:mod:`services.pacs.client` talks to the server (``dicomweb-client``, with wlcad's size bounds and
timeouts); :mod:`services.pacs.run` is the one flow ``wlcad pacs run`` runs. See docs/pacs.md.
"""
