"""Everything after extraction, one room per job: `models` (the heads), `training` (the training core and
grids), `finetune` (end-to-end), `saved` (kept weights, model folders, scoring), `explain`, `report`."""
