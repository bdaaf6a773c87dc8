"""wlcad offline training: imports the same pipelines as serving and exports to model_repository/."""
