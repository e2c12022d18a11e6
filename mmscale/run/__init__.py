"""The training loop and what it writes into run.dir.

    train.py     the one loop for every engine and launcher (`python -m mmscale.train` enters here)
    rundir.py    a run dir belongs to one run: its marker and the lock rank 0 holds
    checkpoint.py  run.dir/checkpoints: the protocol around the engines' files (find / restore / save, `latest`,
                 retention, digests); engines never import it (they read checkpoint_format.py)
    metrics.py   metrics.jsonl (the writer, the one reader, trim on resume), progress bar, wandb, TensorBoard, PNG
    mfu.py       model FLOPs per token and MFU against the device's peak
    samples.py   generated samples at chosen steps (samples.jsonl)
    profiler.py  the torch.profiler window (log.profile_steps) and the CUDA memory snapshot
"""
