"""`python -m jobs.prompt INPUT OUTPUT ...`: the same as `phi4mm prompt` (for `ray job submit`)."""
import sys

from jobs.cli import run_job_main

if __name__ == "__main__":
    sys.exit(run_job_main("prompt"))
