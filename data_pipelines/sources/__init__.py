"""Data sources: each yields Record or Rejection objects (see data_pipelines.records)."""
