"""Weight-level compression shared by prune-weights and cluster-weights: the layers whose weights qualify
(``layers``), their input second moments, magnitude masks and the masked least-squares refit (``masks``), and
weighted k-means (``kmeans``)."""
