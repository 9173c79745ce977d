"""The `fahr` command line: one console script, each subcommand a Hydra app."""
