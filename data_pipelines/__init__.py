"""Raw photos and cohort tables -> aligned, de-identified webdataset shards (issue 3)."""
