"""The study layer, above both stages: a study folder's `study.yaml`, its grid, the expansion into entries,
the plan against the records, the executors (inline, submitit local or SLURM) and the report. It imports
`featcache` and `adapters`; neither imports it."""
