"""Explanations: attribution maps (Grad-CAM, Integrated Gradients), the pages that show them, and their
evaluation as the ALOE appendix measures it (pointing game, deletion)."""
