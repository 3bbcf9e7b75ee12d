"""The paper's MLP heads, stacked M at a time; one implementation for cached training and fine-tuning."""
