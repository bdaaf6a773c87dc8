"""The ``wlcad`` command line: one subcommand module per job, all thin adapters over the pipelines."""
