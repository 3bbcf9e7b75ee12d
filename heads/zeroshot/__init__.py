"""Zero-shot quality from a vision-language backbone's own text tower (CLIP-IQA), on cached image embeddings."""
