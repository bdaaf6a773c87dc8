"""CIRCUS DB: its case labels as wlcad weak labels, a bounded client of its API, and the sync that
pulls a case, estimates voxel labels and posts them back as a new revision (docs/circus_db.md)."""
