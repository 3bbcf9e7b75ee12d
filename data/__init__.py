"""Datasets: one adapter per benchmark, all writing one common manifest."""
