"""Cloud TPU queued resources: create, copy the code, install, train on every worker, stream logs, delete.

    python -m launch.tpu up NAME --tpu v5e-8 --zone us-west4-a --project P --config configs/sft_digits.py
    python -m launch.tpu {create,run,logs,delete,up} ... --dry-run   # print every gcloud command only

Modules: `accelerators` (TPU names -> gcloud accelerator type, runtime, hosts), `commands` (pure
functions building gcloud argv lists), `lifecycle` (runners, waiting, cleanup on Ctrl-C), `bundle`
(the code tarball copied to the workers), `__main__` (the CLI).
"""
