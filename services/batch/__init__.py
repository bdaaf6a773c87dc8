"""Archive-scale batch: cases split into shards that run as separate processes (a Kubernetes Indexed
Job's pods), and the merge of their summaries (docs/deploy.md, "Archive-scale batch")."""
