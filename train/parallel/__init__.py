"""How the model is spread over the ranks: DDP replicas (train/step.py wraps them) or FSDP2 shards
(fsdp.py), and which rows of each tensor a rank holds (shards.py)."""
