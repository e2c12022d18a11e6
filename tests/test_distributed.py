"""Rank / node layout detection from each launcher's environment (mmscale.distributed.detect)."""
from mmscale.distributed import detect


def test_deepspeed_launcher_local_size_beats_a_stale_local_world_size():
    # the deepspeed launcher exports LOCAL_SIZE only; LOCAL_WORLD_SIZE=1 here leaked from a caller
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    info = detect(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (1, 1, 2, 2)


def test_torchrun_local_world_size_and_single_node_default():
    assert detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}).local_world_size == 2
    assert detect({"RANK": "0", "WORLD_SIZE": "4"}).local_world_size == 4
    assert detect({}).local_world_size == 1 and detect({}).world_size == 1


def test_slurm_tasks_per_node_forms():
    base = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "6", "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "127.0.0.1"}
    assert detect({**base, "SLURM_NTASKS_PER_NODE": "3"}).local_world_size == 3
    assert detect({**base, "SLURM_TASKS_PER_NODE": "2(x3)"}).local_world_size == 2
    assert detect({**base, "SLURM_NNODES": "3"}).local_world_size == 2
