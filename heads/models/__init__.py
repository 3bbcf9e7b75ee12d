"""Head models, stacked M at a time: the MLP heads and their activations, the hyper-network head, fusion over
stored stages, and the frozen-feature probes. One implementation serves cached training and fine-tuning."""
