"""`fahr report`: one self-contained HTML page of a run's, an evaluation's or an analysis's results."""
