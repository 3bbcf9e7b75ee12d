"""End-to-end fine-tuning (LoRA, full, frozen): the backbone and one head trained on images through the
training core's data order, schedule, loss and selection."""
