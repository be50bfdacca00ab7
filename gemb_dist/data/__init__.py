"""Training data: WebDataset tar shards streamed exactly once per epoch, equally across ranks, resumably.

The trainer's interface::

    stream = build_train_stream(cfg.data, cfg.model, tokenizer, rank=rank, world_size=world_size)
    stream.steps_per_epoch      # global steps of the current epoch, identical on every rank
    for batch in stream:        # gemb_dist.batch.TrainBatch, this rank's data.global_batch_size // world_size rows,
        ...                     # from the current position to the end of the epoch; then the next epoch begins
    stream.state_dict()         # epoch, steps consumed, carried remainder, layout: checkpoint it with the model
    stream.load_state_dict(s)   # resume right after the last consumed batch (re-partitions a changed layout)
    stream.stats                # cumulative counts: bad_samples, truncated_texts (+ per side), samples, remainder

Batches are tokenized in the DataLoader workers (`data.num_workers`); queries get their task prompt
(`model.prompts` / `model.default_prompt`), texts are truncated to `model.max_length` and counted.

How it stays exact (see `plan.py`): every rank computes the same plan from the manifest and (seed, epoch);
a global step is a slice of one group's order split into equal rank slices, so all ranks take the same
number of steps; the remainder (fewer samples than one global batch, per task in fine-tuning mode) is
logged, counted in `stats["remainder"]` and carried to the front of the next epoch. Unreadable samples are
counted and replaced within their batch (`reader.py`) so that batch shapes and step counts never change.

Modules: `schema` (sample validation), `build` (`gemb data build`), `storage` (local, file://, s3://),
`manifest`, `plan`, `position` (checkpointable position), `shards` (tar reading), `collate`, `reader`
(IterableDataset + TrainStream), `audit` (`gemb data audit`), `cli`.
"""

from gemb_dist.data.reader import PlanDataset, TrainStream, build_train_stream

__all__ = ["PlanDataset", "TrainStream", "build_train_stream"]
