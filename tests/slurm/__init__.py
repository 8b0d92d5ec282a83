"""The SLURM test harness: a real single-node cluster on localhost (see cluster.py)."""
