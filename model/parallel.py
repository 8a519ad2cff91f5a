"""trainer=fsdp: FSDP2 over every device of every node, through Lightning's ModelParallelStrategy.

ModelParallelStrategy's own "auto" sizes make the data-parallel group the number of nodes and the tensor-parallel
group the devices of a node, so `devices: auto` on one node asked for tensor parallelism over all GPUs, which this
model does not apply (and `data_parallel_size: ${trainer.devices}` passed the string "auto"). Here the data-parallel
size is the world size, resolved once the devices are known; SinkAwareLM.configure_model shards over that mesh.
"""

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDPStrategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        """save_distributed_checkpoint=False: rank 0 gathers the full weights and optimizer state into one
        checkpoint file, the format of the other strategies (train.py's resume and eval.py read it)."""
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the same model
        super().setup_environment()
