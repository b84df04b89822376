"""The run directory as a service, used by train/ and eval/ alike: atomic writes (atomic.py), the
JSON-lines logs (logs.py), checkpoints with manifests (checkpoint.py), the one safe loader
(safe_load.py: no pickles), the run directory itself (run_dir.py) and signal deferral (signals.py)."""
