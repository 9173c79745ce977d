# The start every fahr sbatch template shares (common.sh for training, shards.sbatch): sourced, never run.
#
# Strict bash, the submit directory as the working directory (relative paths in overrides mean what
# they meant where sbatch was run), the fahr command, few threads per process.
#
# Environment it reads (optional):
#   FAHR   the fahr command; e.g. FAHR="/path/to/venv/bin/fahr" or "python -m fahr.cli.main"
#          (`fahr shards launcher=slurm` sets it to the python that submitted the jobs)

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
FAHR=${FAHR:-fahr}
# Data loading and decoding run in worker processes; each process needs few threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
