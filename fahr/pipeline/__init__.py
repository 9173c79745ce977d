"""What each `fahr` subcommand does, as plain functions of a composed config (tests call these)."""
