"""Downpour SGD's roles (train/downpour.py is the command line and the launch).

``setup``: the experiment checked before any process starts; ``calls``: RPC with a time-out; ``shard``: a
parameter-server shard; ``replica``: a model replica; ``coordinator``: rank 0's shared state and RPC endpoints;
``run``: rank 0's life (shards started, replicas watched, checkpoints); ``records``: its records, evaluation and
summary. RPC sends functions by qualified name, so every process imports these same modules.
"""
