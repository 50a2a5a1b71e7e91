"""Job drivers behind the thin `ray_jobs/*.py` entry scripts."""
