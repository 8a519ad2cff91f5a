"""What a train.py checkpoint is, and how it is written: docs/checkpointing.md.

reader.py  find, validate and read a checkpoint (one file, or a folder of shards under trainer=fsdp): used by train.py's
           resume, the callbacks, calibration, evaluation and export
writer.py  write one safely, outside the training process (CheckpointIO plugins for the Trainer)
lock.py    one live train.py per run directory
"""
