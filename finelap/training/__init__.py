"""The parts of the trainer (finelap.train) that are not its loop.

Set-up: `runtime` (process group, device, precision), `engine` (frozen modules, AdamW, the
DeepSpeed config). Hooks, attached to the loop at the points `hooks` names: `startup` (where
start-up time goes), `run_log` (the step log with its time-left estimate, the per-rank sample log),
`profile` (--profile), `evaluation` (periodic evaluation of checkpoints), `probe`
(--probe-embeddings).
"""
