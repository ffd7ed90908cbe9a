"""Datasets, batches and the order in which each rank sees samples."""
